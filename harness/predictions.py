"""Per-example predictions, computed once and kept with the results.

An evaluation reads a model's predicted classes on a cell's test images
(``EvalContext.predict(role, split)``). Each set of predictions is computed
once per (model checkpoint, test images, trigger) and kept in the work
directory, ``<workdir>/predictions/<id>.safetensors``, where every evaluation
that needs it finds it: the evaluators of a cell, the other cells of the same
attacked model (its backdoored predictions serve every defense's row), later
runs with new evaluators, and other processes (pool workers, several
``harness run`` on one work directory). A new metric over the same predictions
needs no new inference, and a reader can audit a number down to the images.

The id hashes:

- the model: the key of the train or purify job that produced the checkpoint,
  and the checkpoint's recorded sha256 (a job recomputed into other weights
  gets other predictions);
- the images: the cell's test set, i.e. the data spec of the attacked model's
  train job;
- the trigger (``poisoned`` split only): the attacked model's train job key
  (it fixes the attack, its config and versions) and the sha256 of the
  checkpoints its state is loaded from (prepared resources, learned trigger).

A file holds two tensors of one length, one row per test image:

- ``pred``: the predicted class, uint8 when the class count allows (else
  int16, int32);
- ``index``: int32, each row's image's index in the cell's clean test set
  (for ``poisoned``: the test images the attack's ``poison_test`` kept, from
  its ``meta["index"]``; -1 where an attack does not say);

and, as safetensors metadata, what it is the predictions of (``model``,
``model_sha256``, ``split``, ``images``, ``trigger``, ``trigger_key``,
``num_classes``, ``count``), a sha256 of the two tensors, and the device and
harness version that computed it. Each evaluate record names the files it read
(``JobRecord.predictions``: ``"role:split"`` -> path relative to the work
directory); :func:`load` reads them back.

Files are written atomically (temporary file, then rename) under an exclusive
``flock`` on ``predictions/.locks/<id>.lock``, held while checking and
computing, so concurrent processes never compute the same predictions twice.
A file that does not read back whole and consistent (truncated, corrupt,
another length or index than expected, a sha256 mismatch) is never trusted:
it is recomputed. A valid file is never rewritten, so the numbers of a record
stay the numbers of its files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .errors import HarnessError
from .store import JobRecord, Store, atomic_file, disk_full_error, no_space
from .train import predict

#: the folder of a work directory that holds the predictions
FOLDER = "predictions"
#: bump when what a file holds (or how predictions are computed) changes: it is part of every id
FORMAT = "backdoor-harness predictions 1"
#: the splits: the clean test set, and the attack's poisoned test set
SPLITS = ("clean", "poisoned")
#: how many sets of predictions a process keeps in memory
CACHE = 128


class Predictions(NamedTuple):
    """One set of predictions as :func:`load` reads it back.

    Attributes:
        index: int64 ``[N]``: each row's image's index in the cell's clean test set (-1: unknown).
        pred: int64 ``[N]``: the class the model predicted for it.
        meta: what the file says it is (model, split, trigger, images, num_classes, count, ...).
    """

    index: torch.Tensor
    pred: torch.Tensor
    meta: dict[str, str]


def pred_dtype(num_classes: int) -> torch.dtype:
    """The smallest dtype that holds every class index of ``num_classes`` classes."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 1 << 15:
        return torch.int16
    return torch.int32


def prediction_id(model: str, model_sha256: str | None, images: dict, trigger: dict | None) -> str:
    """The stable id of the predictions of a model (job key and checkpoint sha256) on a cell's test
    images (data spec), triggered (``trigger``: see :class:`PredictionStore`) or not (None)."""
    blob = json.dumps({"format": FORMAT, "model": model, "model_sha256": model_sha256, "images": images,
                       "trigger": trigger}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _digest(index: torch.Tensor, pred: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (index, pred):
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """The index, predictions and metadata of a file, checked in itself: the two tensors (and nothing
    else) of one length, the metadata's format, count and class count, the sha256 of the tensors,
    every prediction a class. Raises ValueError (or the reader's error) saying what is wrong."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if set(f.keys()) != {"index", "pred"}:
            raise ValueError(f"holds tensors {sorted(f.keys())}, not index and pred")
        index, pred = f.get_tensor("index"), f.get_tensor("pred")
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
    count, num_classes = int(meta["count"]), int(meta["num_classes"])
    if index.shape != (count,) or pred.shape != (count,):
        raise ValueError(f"index {tuple(index.shape)} and pred {tuple(pred.shape)}, not ({count},) as its "
                         f"metadata says")
    if index.dtype != torch.int32 or pred.dtype != pred_dtype(num_classes):
        raise ValueError(f"dtypes {index.dtype} and {pred.dtype}, not int32 and {pred_dtype(num_classes)}")
    if _digest(index, pred) != meta.get("sha256"):
        raise ValueError("its tensors do not match their recorded sha256")
    if count and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"a prediction outside the {num_classes} classes")
    return index, pred, meta


class PredictionStore:
    """The predictions of one work directory (``<workdir>/predictions/``), with an in-memory LRU
    layer so that a process reads a file once.

    Args:
        workdir: the work directory.
        warn: where a corrupt file is reported before it is recomputed (default: standard error).
        cache: how many sets of predictions to keep in memory.
    """

    def __init__(self, workdir: str | Path, warn: Callable[[str], None] | None = None, cache: int = CACHE):
        self.workdir = Path(workdir)
        self.folder = self.workdir / FOLDER
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.size = cache
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    def path(self, ident: str) -> Path:
        return self.folder / f"{ident}.safetensors"

    def relpath(self, ident: str) -> str:
        """A file's path relative to the work directory (what records name)."""
        return f"{FOLDER}/{ident}.safetensors"

    def get(self, *, model_key: str, model_sha256: str | None, images: dict, split: str, trigger: dict | None,
            index: torch.Tensor, num_classes: int, model: Callable[[], torch.nn.Module], inputs: torch.Tensor,
            device: torch.device) -> tuple[torch.Tensor, str]:
        """The int64 predictions of a model on a split, and their file (relative to the work
        directory): from memory, else from a valid file, else computed (``predict(model(), inputs,
        device)``; ``model`` is called only then) and written, under the file's lock.

        Args:
            model_key, model_sha256: the train or purify job that produced the model, its checkpoint's sha256.
            images: the cell's test set (the attacked model's train job's data spec).
            split: ``clean`` or ``poisoned``.
            trigger: None for ``clean``; for ``poisoned``, what fixes the trigger (the attacked train
                job's key and the sha256 of the checkpoints the attack's state comes from).
            index: each input image's index in the clean test set (what the file's ``index`` must be).
            num_classes: the data set's class count.
            inputs: the uint8 images (``len(index)`` of them).
        """
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if (trigger is None) != (split == "clean"):
            raise ValueError(f"the {split} split {'needs' if split == 'poisoned' else 'has no'} trigger")
        if len(index) != len(inputs):
            raise ValueError(f"{len(inputs)} images but {len(index)} indices")
        ident = prediction_id(model_key, model_sha256, images, trigger)
        rel = self.relpath(ident)
        if ident in self._memo:
            self._memo.move_to_end(ident)
            return self._memo[ident].clone(), rel
        expect = {"model": model_key, "split": split, "num_classes": str(num_classes), "count": str(len(index)),
                  "id": ident}
        index32 = index.to(torch.int32)
        pred = self._valid(ident, expect, index32, report=False)  # no lock to read a finished file
        if pred is None:
            with self._locked(ident):
                pred = self._valid(ident, expect, index32, report=True)
                if pred is None:
                    pred = predict(model(), inputs, device).to(torch.int64)
                    if pred.shape != (len(index),):
                        raise HarnessError(f"predicting {split} test images of {model_key}: got {tuple(pred.shape)} "
                                           f"predictions for {len(index)} images")
                    meta = {**expect, "model_sha256": model_sha256 or "", "images": _json(images),
                            "trigger": _json(trigger) if trigger else "",
                            "trigger_key": str(trigger.get("train", "")) if trigger else "",
                            "device": str(device), "created": f"{time.time():.3f}"}
                    self._write(ident, index32, pred, num_classes, meta)
        self._memo[ident] = pred
        while len(self._memo) > self.size:
            self._memo.popitem(last=False)
        return pred.clone(), rel

    def _valid(self, ident: str, expect: dict[str, str], index: torch.Tensor, report: bool) -> torch.Tensor | None:
        """The int64 predictions of file ``ident`` if it exists and is valid and the one expected
        (``expect``'s metadata, ``index``); else None (``report``: say why, when it exists)."""
        path = self.path(ident)
        if not path.exists():
            return None
        try:
            got, pred, meta = _read(path)
            wrong = {k: meta.get(k) for k, v in expect.items() if meta.get(k) != v}
            if wrong:
                raise ValueError(f"metadata {wrong}, not {({k: expect[k] for k in wrong})}")
            if not torch.equal(got, index):
                raise ValueError("its index is not the test images the evaluation has")
        except Exception as err:  # any unreadable or inconsistent file: recomputed, never trusted
            if report:
                self.warn(f"predictions file {path} is unusable ({' '.join(str(err).split())[:200]}); recomputing it")
            return None
        return pred.to(torch.int64)

    @contextmanager
    def _locked(self, ident: str) -> Iterator[None]:
        locks = self.folder / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{ident}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _os_error(err, self.folder) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, ident: str, index: torch.Tensor, pred: torch.Tensor, num_classes: int,
               meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        from . import __version__

        small = pred.to(pred_dtype(num_classes)).contiguous()
        index = index.contiguous()
        meta = {**meta, "format": FORMAT, "sha256": _digest(index, small), "harness_version": __version__}
        try:
            with atomic_file(self.path(ident)) as tmp:
                save_file({"index": index, "pred": small}, str(tmp), metadata=meta)
        except OSError as err:
            raise _os_error(err, self.folder) from None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _os_error(err: OSError, folder: Path) -> Exception:
    if no_space(err):
        return disk_full_error(folder, str(err))
    return HarnessError(f"cannot write predictions in {folder} ({err}); the work directory must be writable")


# -- reading them back --------------------------------------------------------------------------


def load(workdir: str | Path, record: JobRecord | str) -> dict[str, Predictions]:
    """The predictions an evaluation read, for auditing it: ``"role:split"`` -> :class:`Predictions`
    (``index`` into the cell's clean test set, ``pred``, the file's metadata).

    Args:
        workdir: the work directory of the run.
        record: an evaluate record, or its job key (or a unique prefix of it) in ``workdir``'s store.

    ``index`` maps each prediction to its test image: ``clean_test.images[index]`` for the ``clean``
    split, and for ``poisoned``, the same images with the attack's trigger (``poison_test`` of the
    clean test set keeps exactly those). For example, an evaluation's clean accuracy is
    ``(pred == clean_test.labels[index]).float().mean()`` over ``load(w, key)["purified:clean"]``.

    Raises HarnessError for an unknown key, or a file that is missing or fails its checks.
    """
    workdir = Path(workdir)
    if isinstance(record, str):
        store = Store(workdir, readonly=True)
        try:
            found = store.find(record)
        finally:
            store.close()
        if len(found) != 1:
            raise HarnessError(f"{len(found) or 'no'} jobs with a key starting {record!r} in {workdir}; give "
                               f"{'more characters of ' if found else ''}an evaluate job's key "
                               f"(`harness status --workdir {workdir}`)")
        record = found[0]
    out = {}
    for name, rel in sorted(record.predictions.items()):
        path = workdir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise HarnessError(f"record {record.key}: predictions path {rel!r} is not inside {workdir}")
        if not path.exists():
            raise HarnessError(f"record {record.key}: its {name} predictions {path} are missing (deleted since "
                               f"the evaluation, or a record from another work directory than {workdir})")
        try:
            index, pred, meta = _read(path)
        except Exception as err:
            raise HarnessError(f"record {record.key}: its {name} predictions {path} are unreadable "
                               f"({' '.join(str(err).split())[:200]})") from None
        out[name] = Predictions(index.to(torch.int64), pred.to(torch.int64), meta)
    return out
