"""Checkpoint folders: ``model.pt`` (weights only), ``train_state.pt`` (optimiser etc.) and ``meta.json``.

``load_model`` accepts a checkpoint folder or a run folder (whose ``result.json`` names the
best checkpoint), on local disk or S3.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdray import KdrayError, first_line, storage
from kdray.pinning import check_digest, sha256_hex
from kdray.schemas import CheckpointMeta, RunSummary, dump, parse

if TYPE_CHECKING:  # torch loads only where weights are read or written
    import torch

MODEL_FILE, STATE_FILE, META_FILE, RESULT_FILE = "model.pt", "train_state.pt", "meta.json", "result.json"


def save_checkpoint(folder: str, model_state: dict, meta: CheckpointMeta | dict,
                    train_state: dict | None = None) -> None:
    import torch

    meta = meta if isinstance(meta, CheckpointMeta) else parse(CheckpointMeta, meta, folder)
    os.makedirs(folder, exist_ok=True)
    torch.save(model_state, os.path.join(folder, MODEL_FILE))
    if train_state is not None:
        torch.save(train_state, os.path.join(folder, STATE_FILE))
    write_checkpoint_meta(folder, meta)


def _torch_load(data: bytes, what: str) -> dict:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise KdrayError(f"{what}: corrupt or unreadable checkpoint ({first_line(exc, 160)})") from None


def resolve_checkpoint(uri: str) -> str:
    """Return the checkpoint folder URI for a checkpoint folder or a run folder."""
    if storage.exists(storage.join(uri, META_FILE)):
        return uri
    result = storage.join(uri, RESULT_FILE)
    if storage.exists(result):
        return read_run_summary(uri).best_checkpoint
    raise KdrayError(f"{uri}: not a checkpoint (no {META_FILE}) nor a finished run (no {RESULT_FILE})")


def read_checkpoint_meta(uri: str) -> CheckpointMeta:
    """The checkpoint's ``meta.json`` (for a checkpoint or run folder), validated."""
    meta_uri = storage.join(resolve_checkpoint(uri), META_FILE)
    return parse(CheckpointMeta, storage.read_json(meta_uri), meta_uri)


def write_checkpoint_meta(folder: str, meta: CheckpointMeta) -> None:
    storage.write_json(storage.join(folder, META_FILE), dump(meta))


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's model (eval mode), its meta, its folder, and the sha256 of the weights bytes it was built from."""

    model: torch.nn.Module
    meta: CheckpointMeta
    folder: str
    sha256: str


def load_checkpoint(uri: str, expected_sha256: str | None = None) -> LoadedCheckpoint:
    """Build the model a checkpoint describes and load its weights (``weights_only=True``). The weights file is
    read once: its digest (checked against ``expected_sha256`` when given) is that of the bytes loaded."""
    from kdray.models import build_model

    folder = resolve_checkpoint(uri)
    meta = read_checkpoint_meta(folder)
    weights = storage.join(folder, MODEL_FILE)
    data = storage.read_bytes(weights)
    if expected_sha256 is not None:
        check_digest(weights, data, expected_sha256, "checkpoint_digest_mismatch", "the model card's")
    state = _torch_load(data, folder)
    model = build_model(meta.model_name, len(meta.classes), meta.dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise KdrayError(f"{folder}: weights do not match model {meta.model_name} ({str(exc)[:160]})") from None
    model.eval()
    return LoadedCheckpoint(model, meta, folder, sha256_hex(data))


def load_model(uri: str) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build the model a checkpoint describes and load its weights (``weights_only=True``)."""
    loaded = load_checkpoint(uri)
    return loaded.model, loaded.meta


def load_train_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fh:
        return _torch_load(fh.read(), path)


def weights_digest(uri: str) -> str:
    """sha256 of a checkpoint's weights file: the teacher's identity in logit-cache fingerprints."""
    folder = resolve_checkpoint(uri)
    return sha256_hex(storage.read_bytes(storage.join(folder, MODEL_FILE)))


def read_run_summary(run_uri: str) -> RunSummary:
    result = storage.join(run_uri, RESULT_FILE)
    return parse(RunSummary, storage.read_json(result), result)


def write_run_summary(summary: RunSummary) -> None:
    storage.write_json(storage.join(summary.run_uri, RESULT_FILE), dump(summary))
