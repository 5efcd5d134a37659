"""Training data: the item shapes each trainer reads, checked inline at submit and row by
row in the trainer process, and the loading of files, dataset directories and downloads.

The checks import nothing heavy; `load` imports `datasets` and runs in the trainer process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from datasets import Dataset

Shape = Literal["sft", "preference", "prompt"]

SHAPES: dict[Shape, str] = {
    "sft": "{text}, {prompt, completion} or {messages: [{role, content}, ...]}",
    "preference": "{prompt, chosen, rejected}",
    "prompt": "{prompt} or a prompt string",
}


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _text_or_messages(value: Any) -> bool:
    return _text(value) or _messages(value)


def item_problem(shape: Shape, item: Any) -> str | None:
    """Why one item cannot be trained on as `shape`, or None when it can."""
    if shape == "prompt" and isinstance(item, str):
        return None if item.strip() else "empty prompt"
    if shape == "sft" and isinstance(item, str):
        return None if item.strip() else "empty text"
    if not isinstance(item, dict):
        return f"expected {SHAPES[shape]}"
    if shape == "sft":
        if "messages" in item:
            return (
                None
                if _messages(item["messages"])
                else "messages must be a non-empty list of {role: str, content: str}"
            )
        if "text" in item:
            return None if _text(item["text"]) else "text must be a non-empty string"
        if "prompt" in item or "completion" in item:
            missing = [k for k in ("prompt", "completion") if not _text_or_messages(item.get(k))]
            return f"missing or empty {', '.join(missing)}" if missing else None
        return f"expected {SHAPES[shape]}"
    keys = ("prompt", "chosen", "rejected") if shape == "preference" else ("prompt",)
    missing = [k for k in keys if k not in item]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}: expected {SHAPES[shape]}"
    empty = [k for k in keys if not _text_or_messages(item[k])]
    if empty:
        return f"{', '.join(repr(k) for k in empty)} must be non-empty text or messages"
    return None


def _columns(item: Any) -> str:
    """Which of its shape's forms an item has: the trainers take one form per dataset."""
    if not isinstance(item, dict):
        return "text"
    for form in ("messages", "text"):
        if form in item:
            return form
    return "prompt/completion" if "completion" in item else "prompt"


def items_problems(shape: Shape, items: list[Any], where: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    first = _columns(normalise(shape, items[0])) if items else None
    for i, item in enumerate(items):
        if (problem := item_problem(shape, item)) is not None:
            problems.append((f"{where}[{i}]", problem))
        elif shape == "sft" and (form := _columns(normalise(shape, item))) != first:
            problems.append(
                (
                    f"{where}[{i}]",
                    f"{{{form}}} item among {{{first}}} ones: use one form throughout",
                )
            )
        if len(problems) >= 20:
            break
    return problems


def normalise(shape: Shape, item: Any) -> dict[str, Any]:
    """A bare string as the one column its shape reads."""
    if isinstance(item, str):
        return {"prompt": item} if shape == "prompt" else {"text": item}
    return dict(item)


class DataError(ValueError):
    """The data cannot be trained on as given (never helped by another attempt)."""


def load(source: dict[str, Any], shape: Shape) -> Dataset:
    """The job's data as one `datasets.Dataset`, every row checked against `shape`.

    `source`: {"type": "list", "items": [...]} or {"type": "jsonl"|"parquet"|"dataset"|"path",
    "path": local path} (a download arrives as "path": a file or an extracted directory).
    """
    from datasets import Dataset

    kind = source["type"]
    if kind == "list":
        dataset = Dataset.from_list([normalise(shape, it) for it in source["items"]])
    else:
        dataset = _load_path(Path(source["path"]), kind)
    if len(dataset) == 0:
        raise DataError("spec.data: the dataset has no rows")
    if kind != "list":
        _check_rows(dataset, shape)
    return dataset


def _load_path(path: Path, kind: str) -> Dataset:
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if not path.exists():
        raise DataError(f"spec.data: {path} does not exist")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
        else:
            loaded = load_dataset(str(path))
    else:
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        fmt = {"jsonl": "json", "parquet": "parquet"}.get(kind)
        fmt = fmt or {
            ".jsonl": "json",
            ".json": "json",
            ".jsonl.gz": "json",
            ".parquet": "parquet",
            ".csv": "csv",
        }.get(suffix)
        if fmt is None:
            raise DataError(
                f"spec.data: cannot tell the format of {path.name} (.jsonl, .json, .parquet, .csv)"
            )
        loaded = load_dataset(fmt, data_files=str(path))
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise DataError(f"spec.data: no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    if not isinstance(loaded, Dataset):
        raise DataError(f"spec.data: {path} is not a dataset")
    return loaded


def _check_rows(dataset: Dataset, shape: Shape) -> None:
    columns = set(dataset.column_names)
    if shape == "sft" and not (
        {"text"} <= columns or {"messages"} <= columns or {"prompt", "completion"} <= columns
    ):
        raise DataError(f"spec.data: columns {sorted(columns)}; expected {SHAPES[shape]}")
    for i, row in enumerate(dataset):
        problem = item_problem(shape, {k: v for k, v in row.items() if v is not None})
        if problem is not None:
            raise DataError(f"spec.data row {i}: {problem}")
