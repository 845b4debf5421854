"""TorchMultimodal's video VQ-VAE and a MUGEN-style text -> video MultimodalGPT built at
fmm's config sizes with random, non-trivial weights: the reference that
tests/models/test_videogpt.py and benchmarks/video.py compare fmm's VideoGPT against."""

import torch
from torch import nn

from models.videogpt import VideoGPTConfig, VideoVQVAEConfig
from tests.reference import reference

tmm_vg = reference("torchmultimodal.models.video_gpt.model")
tmm_gpt = reference("torchmultimodal.models.video_gpt.gpt")
tmm_pos = reference("torchmultimodal.modules.layers.position_embedding")
tmm_attn = reference("torchmultimodal.modules.layers.attention")


def reference_vqvae(cfg: VideoVQVAEConfig, seed: int = 0):
    """TorchMultimodal's ``video_vqvae`` for ``cfg``, in eval mode."""
    torch.manual_seed(seed)
    model = tmm_vg.video_vqvae(
        conv_filter_sizes=cfg.down_kernels, conv_filter_strides=cfg.down_strides,
        encoder_filter_size=cfg.encoder_kernel, encoder_filter_stride=cfg.encoder_stride,
        in_channel_dim=cfg.in_channels, encoder_hidden_dim=cfg.encoder_hidden,
        n_res_layers=cfg.res_layers, attn_hidden_dim=cfg.attn_hidden,
        num_embeddings=cfg.codebook_size, embedding_dim=cfg.code_dim,
        decoder_hidden_dim=cfg.decoder_hidden,
    )  # fmt: skip
    # Non-trivial batch-norm statistics and a random codebook, so eval mode is exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.codebook.embedding = torch.randn_like(model.codebook.embedding) * 0.3
    model.codebook._is_embedding_init = True
    return model.eval()


class _TextTokenizer(nn.Module):
    """A MUGEN-style in-tokenizer: ids in, embeddings looked up (test-only)."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)

    def encode(self, x):
        return x

    def lookup(self, ids):
        return self.embedding(ids)


def reference_gpt(cfg: VideoGPTConfig, vq_cfg: VideoVQVAEConfig, seed: int = 1):
    """A ``MultimodalGPT`` over ``cfg`` with ``reference_vqvae(vq_cfg)`` as its out-tokenizer."""
    vq = reference_vqvae(vq_cfg, seed=seed)
    torch.manual_seed(seed)
    layer = tmm_gpt.TransformerDecoderLayer(
        cfg.width, cfg.heads, dropout=0.0, attn_module=tmm_attn.SelfAttention(attn_dropout=0.0)
    )
    decoder = tmm_gpt.MultimodalTransformerDecoder(
        nn.Embedding(cfg.text_len, cfg.width),  # MUGEN's text positions
        tmm_pos.BroadcastedPositionEmbedding(cfg.latent_shape, cfg.width),
        tmm_gpt.TransformerDecoder(layer, cfg.layers),
        tmm_gpt.RightShift(cfg.width),
    )
    model = tmm_gpt.MultimodalGPT(
        d_model=cfg.width, num_in_tokens=cfg.text_vocab, num_out_tokens=cfg.video_vocab,
        latent_shape=cfg.latent_shape, in_tokenizer=_TextTokenizer(cfg.text_vocab, cfg.text_dim),
        out_tokenizer=vq, mm_decoder=decoder,
        in_projection=nn.Linear(cfg.text_dim, cfg.width, bias=False),
        out_projection=nn.Linear(cfg.code_dim, cfg.width, bias=False),
    )  # fmt: skip
    model.to_logit.weight.data.normal_(0, 0.5)  # TorchMultimodal starts it at zero
    for p in model.mm_decoder.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()
