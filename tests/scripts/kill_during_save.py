"""Save a sharded checkpoint at step 1, then die by SIGKILL in the middle of saving step 2.

``python tests/scripts/kill_during_save.py ROOT``: used by tests/distributed to show that a
crash mid-save leaves the previous checkpoint as the latest, loadable one.
"""

import os
import signal
import sys

import torch
import torch.distributed.checkpoint.filesystem as fs

from train import checkpoint

root = sys.argv[1]
state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(1)}
checkpoint.save_sharded(root, 1, state)

write_item = fs._write_item


def write_then_die(*args, **kwargs):
    # One tensor reaches the disk, then the process dies before the save can finish.
    result = write_item(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result


fs._write_item = write_then_die
checkpoint.save_sharded(root, 2, {"w": state["w"] + 100, "step": torch.tensor(2)})
print("unreachable: the save above should have killed this process")
