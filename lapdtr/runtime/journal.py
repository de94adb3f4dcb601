"""A crash-safe record of answered requests, so a restarted run (``torchrun --max-restarts K``)
answers each request once and skips what it already answered.

``Journal(path, identity)`` is a directory holding

* ``state.json``: ``{"format": 1, "identity": {...}}``, written once, atomically (tmp file, fsync,
  ``os.replace``, fsync of the directory). ``identity`` says which run the journal belongs to
  (model, checkpoint digest, plan digest, input source, ...): reopening it for another run is a
  ``ValueError`` naming the fields that differ, and touches nothing.
* ``journal.jsonl``: one JSON line per answered request, ``{"request": int, "output": {"dtype",
  "shape", "data": base64 of the raw bytes}, "extra": {...}}`` (``extra`` optional), appended,
  flushed and fsynced before ``record`` returns. A torn last line (a crash mid-write; that
  request was never acknowledged) is dropped and truncated away on open; damage anywhere before
  the last line is a ``ValueError``, never silently skipped.

One writer at a time: the journal holds an exclusive ``flock`` while open (the driver rank opens
it; a second opener gets a ``ValueError``). Raw bytes are the host's byte order (little-endian on
every platform torch ships for).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import torch

__all__ = ["Journal"]

FORMAT = 1
STATE = "state.json"
LOG = "journal.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(obj, what: str):
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-able (str, numbers, bools, None, lists, dicts): "
                         f"{e}") from None


def _encode(t) -> dict:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"output must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_quantized:
        raise ValueError(f"output must be a dense tensor, got layout {t.layout}")
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def _decode(out: dict, where: str) -> torch.Tensor:
    dtype = getattr(torch, str(out["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {out['dtype']!r}")
    shape = [int(n) for n in out["shape"]]
    raw = base64.b64decode(out["data"], validate=True)
    numel = 1
    for n in shape:
        numel *= n
    want = numel * torch.empty((), dtype=dtype).element_size()
    if len(raw) != want:
        raise ValueError(f"{where}: {len(raw)} bytes of data for a {dtype} tensor of shape "
                         f"{shape} ({want} bytes)")
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _is_record(rec) -> bool:
    if not isinstance(rec, dict):
        return False
    out, request = rec.get("output"), rec.get("request")
    return (isinstance(request, int) and not isinstance(request, bool)
            and isinstance(out, dict) and isinstance(out.get("dtype"), str)
            and isinstance(out.get("shape"), list) and isinstance(out.get("data"), str)
            and isinstance(rec.get("extra"), (dict, type(None))))


class Journal:
    """``completed()``, ``output(request)``, ``extra(request)``, ``record(request, tensor,
    extra=None)``; ``len``, ``in``; ``close()`` or use it as a context manager."""

    def __init__(self, path: str | os.PathLike, identity: dict):
        if not isinstance(identity, dict):
            raise ValueError(f"identity must be a dict (e.g. {{'model': ..., 'plan_digest': ...}}),"
                             f" got {type(identity).__name__}")
        self.path = Path(path)
        self.identity = _canonical(identity, "identity")
        self._fd: int | None = None
        self._index: dict[int, tuple[int, int]] = {}  # request -> (offset, length) in the log
        self.path.mkdir(parents=True, exist_ok=True)
        self._open_state()
        self._open_log()

    def _open_state(self) -> None:
        state, log = self.path / STATE, self.path / LOG
        if state.exists():
            try:
                found = json.loads(state.read_text())
                fmt, ident = found["format"], found["identity"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"journal {self.path}: {state} is not a journal state file "
                                 f"({e}); nothing was changed") from None
            if fmt != FORMAT:
                raise ValueError(f"journal {self.path}: format {fmt!r}, this lapdtr reads "
                                 f"format {FORMAT}; nothing was changed")
            if ident != self.identity:
                keys = sorted(set(ident) | set(self.identity))
                diff = "; ".join(
                    f"{k}: expected {json.dumps(self.identity.get(k, '(absent)'))}, "
                    f"found {json.dumps(ident.get(k, '(absent)'))}"
                    for k in keys if ident.get(k, ...) != self.identity.get(k, ...))
                raise ValueError(f"journal {self.path} belongs to another run ({diff}); nothing "
                                 "was changed: use another directory, or delete this one to "
                                 "start afresh")
            return
        if log.exists() and log.stat().st_size > 0:
            raise ValueError(f"journal {self.path}: {log} exists without {state}, so whose run "
                             "it records is unknown; nothing was changed: move it away")
        tmp = state.with_name(STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "identity": self.identity}, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state)
        _fsync_dir(self.path)

    def _open_log(self) -> None:
        log = self.path / LOG
        created = not log.exists()
        fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:
                pass
            except OSError:
                raise ValueError(f"journal {self.path} is open in another process (one writer "
                                 "at a time: only the driver rank records)") from None
            if created:
                _fsync_dir(self.path)
            good = self._load(fd, log)
            if good < os.fstat(fd).st_size:  # a torn last line: drop it before appending
                os.ftruncate(fd, good)
                os.fsync(fd)
            self._size = good
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _load(self, fd: int, log: Path) -> int:
        """Index the log's records; the byte length of its intact part."""
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        pos, lineno = 0, 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            last = end == -1 or not data[end + 1:].strip(b"\x00 \t\r\n")
            line = data[pos:] if end == -1 else data[pos:end]
            lineno += 1
            try:
                rec = json.loads(line)
                ok = end != -1 and _is_record(rec)
            except ValueError:
                ok = False
            if not ok:
                if last:
                    return pos
                raise ValueError(f"journal {log}: line {lineno} is not a journal record, and "
                                 "it is not the last line (not a torn write): the journal is "
                                 "damaged; restore it or move it away")
            self._index.setdefault(rec["request"], (pos, end + 1 - pos))
            pos = end + 1
        return pos

    # -- reading -------------------------------------------------------------------------------
    def completed(self) -> set[int]:
        return set(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, request) -> bool:
        return request in self._index

    def _read(self, request: int) -> dict:
        self._check_open()
        if request not in self._index:
            raise KeyError(f"request {request} is not in journal {self.path} "
                           f"({len(self)} recorded)")
        offset, length = self._index[request]
        return json.loads(os.pread(self._fd, length, offset))

    def output(self, request: int) -> torch.Tensor:
        return _decode(self._read(request)["output"], f"journal {self.path}, request {request}")

    def extra(self, request: int) -> dict | None:
        return self._read(request).get("extra")

    # -- writing -------------------------------------------------------------------------------
    def record(self, request: int, tensor: torch.Tensor, extra: dict | None = None) -> bool:
        """Append ``request``'s output, durably (fsync) before returning True; False, writing
        nothing, if ``request`` is already recorded (no request is answered twice)."""
        self._check_open()
        if isinstance(request, bool) or not isinstance(request, int):
            raise ValueError(f"request must be an int, got {request!r}")
        if request in self._index:
            return False
        rec = {"request": request, "output": _encode(tensor)}
        if extra is not None:
            if not isinstance(extra, dict):
                raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
            rec["extra"] = _canonical(extra, "extra")
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except BaseException:
            os.ftruncate(self._fd, self._size)  # no half record before the next append
            raise
        self._index[request] = (self._size, len(line))
        self._size += len(line)
        return True

    def _check_open(self) -> None:
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, {len(self)} recorded)"
