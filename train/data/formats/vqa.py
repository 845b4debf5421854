"""Visual question answering: ``kind = "vqa"``, ``texts(i)`` the question, ``answers(i)``
every human answer (repeats kept: VQA-v2's ten answers per question weigh the targets by
how many people gave each).

Two layouts:

- VQA-v2's pair of files: ``v2_OpenEnded_mscoco_train2014_questions.json``
  (``{"questions": [{"question_id", "image_id", "question"}], "data_subtype"}``) and its
  annotations, found beside it (``v2_mscoco_train2014_annotations.json``) or given
  (``annotations=``, ``--vqa-annotations``): ``{"annotations": [{"question_id",
  "answers": [{"answer"}]}]}``. Images are ``image_root/COCO_<data_subtype>_<image_id,
  12 digits>.jpg``.
- ALBEF's list: ``[{"image": "train2014/COCO_...jpg", "question": "...", "answer":
  ["...", ...]}]``, image paths against ``image_root`` (default: the file's folder); a
  question without ``"answer"`` has none (a test split).
"""

from __future__ import annotations

from pathlib import Path

from train.data.formats.captions import field, image_root_of, read_json
from train.data.formats.table import FileImages, clean_texts


class Questions(FileImages):
    """Images with a question and its answers each."""

    kind = "vqa"

    def __init__(self, *, source: Path, root: Path, paths, questions, answers):
        super().__init__(format="vqa", source=source, root=root, paths=paths)
        self.questions, self.answer_lists = questions, answers

    def texts(self, i: int) -> tuple[str, ...]:
        return (self.questions[i],)

    def answers(self, i: int) -> tuple[str, ...]:
        return self.answer_lists[i]


def open_vqa(
    path: Path, *, image_root: str | Path | None, annotations: str | Path | None
) -> Questions:
    data = read_json(path)
    if isinstance(data, list):
        return _open_list(path, data, image_root)
    if not isinstance(data, dict) or "questions" not in data:
        raise ValueError(
            f"{path}: a VQA file is VQA-v2's questions ({{'questions': [...]}}) or a list of "
            "{'image', 'question', 'answer'}"
        )
    root = image_root_of(image_root, "vqa")
    subtype = data.get("data_subtype", "")
    notes = _annotations(path, annotations)
    paths, questions, answers = [], [], []
    for n, q in enumerate(data["questions"]):
        where = f"{path} questions[{n}]"
        qid, image_id = field(q, "question_id", where), field(q, "image_id", where)
        if qid not in notes:
            raise ValueError(
                f"{where}: question_id {qid} has no annotation in the annotations file"
            )
        paths.append(f"COCO_{subtype}_{int(image_id):012d}.jpg")
        questions.append(str(field(q, "question", where)).strip())
        answers.append(notes[qid])
    return Questions(source=path, root=root, paths=paths, questions=questions, answers=answers)


def _annotations(questions: Path, given: str | Path | None) -> dict:
    """question_id -> its answers, from the annotations file."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--vqa-annotations {path}: no such file")
    else:
        name = questions.name.replace("OpenEnded_", "").replace("MultipleChoice_", "")
        path = questions.with_name(name.replace("questions", "annotations"))
        if path == questions or not path.is_file():
            raise ValueError(
                f"{questions}: no annotations beside it (looked for {path.name}); "
                "give them with --vqa-annotations"
            )
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: a VQA-v2 annotations file has an 'annotations' list")
    notes = {}
    for n, note in enumerate(data["annotations"]):
        where = f"{path} annotations[{n}]"
        said = [field(a, "answer", where) for a in field(note, "answers", where)]
        notes[field(note, "question_id", where)] = clean_texts(said, where=where)
    return notes


def _open_list(path: Path, data: list, image_root: str | Path | None) -> Questions:
    root = path.parent if image_root is None else image_root_of(image_root, "vqa")
    paths, questions, answers = [], [], []
    for n, entry in enumerate(data):
        where = f"{path} [{n}]"
        paths.append(str(field(entry, "image", where)))
        questions.append(str(field(entry, "question", where)).strip())
        answers.append(clean_texts(entry.get("answer"), where=where))
    return Questions(source=path, root=root, paths=paths, questions=questions, answers=answers)
