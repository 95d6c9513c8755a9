"""Byte-level text data: the embedded default corpus (CPython's own pydoc_data.topics, read at run time),
or any text file. Validation is a held-out contiguous tail; training windows never reach into it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pipelines.errors import SigmaError, say

DEFAULT = "pydoc"


def encode(text: str) -> torch.Tensor:
    # surrogateescape: bytes of a command-line argument that are not UTF-8 (Python keeps them as lone surrogates)
    # come back as those very bytes
    return torch.frombuffer(bytearray(text.encode("utf-8", errors="surrogateescape")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_text(spec: str | None) -> tuple[str, torch.Tensor]:
    """(name, byte ids [N]) of the default corpus or a text file; one-line errors for bad files."""
    if spec in (None, "", DEFAULT):
        from pydoc_data.topics import topics

        return DEFAULT, encode("\n\n".join(topics[k] for k in sorted(topics)))
    path = Path(spec).expanduser()  # "~/x" quoted past the shell (the run records it expanded, as absolute_spec does)
    if not path.is_file():
        raise SigmaError(f"--data '{spec}' is not a text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise SigmaError(f"--data '{spec}' is empty")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SigmaError(f"--data '{spec}' is UTF-16 or UTF-32 text (it starts with a byte-order mark); the model "
                         "reads bytes as UTF-8: save it as UTF-8 first")
    if b"\x00" in raw[:65536]:
        raise SigmaError(f"--data '{spec}' looks binary (NUL bytes), not text")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        say(f"note: --data '{spec}' is not UTF-8 (byte {e.start} is 0x{raw[e.start]:02x}); the model learns its bytes "
            "as they are, but sigma generate shows bytes that are not UTF-8 as \ufffd", once=True)
    return path.name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


class ByteCorpus:
    def __init__(self, spec: str | None, context: int, val_fraction: float = 0.1):
        self.name, ids = load_text(spec)
        self.digest = hashlib.sha256(ids.to(torch.uint8).numpy().tobytes()).hexdigest()
        n_val = max(context + 1, int(len(ids) * val_fraction))
        if len(ids) - n_val < context + 1:  # the least that works: context + 1 bytes for training and as many held out
            raise SigmaError(f"the text has {len(ids)} bytes: too short for a context of {context} plus a validation "
                             f"tail (it needs at least {2 * (context + 1)} bytes)")
        self.train, self.val, self.context = ids[:-n_val], ids[-n_val:], context

    def batch(self, indices_generator: torch.Generator, batch_size: int):
        """A training batch: random windows of the training part ([B, ctx] inputs, [B, ctx] targets)."""
        starts = torch.randint(0, len(self.train) - self.context, (batch_size,), generator=indices_generator)
        windows = torch.stack([self.train[s : s + self.context + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def val_windows(self, max_windows: int | None = None):
        """Consecutive, non-overlapping windows of the validation tail: each byte predicted at most once (a
        remainder shorter than one window at the end is left out)."""
        n = (len(self.val) - 1) // self.context
        if max_windows:
            n = min(n, max_windows)
        x = self.val[: n * self.context].view(n, self.context)
        y = self.val[1 : n * self.context + 1].view(n, self.context)
        return x, y
