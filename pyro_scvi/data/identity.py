"""Which file an input is: its identity, recorded when a run starts reading it.

A streamed input (:class:`~pyro_scvi.data.StreamedCounts`) is read while training goes and
again when the outputs are written (the output ``.h5ad`` of ``pyro-scvi fit`` is a copy of
it). Should the file be replaced or deleted meanwhile, the outputs would pair the model's
rows with another file's cells. :class:`FileIdentity` records the file when the run
starts; :meth:`FileIdentity.check` says, before anything is written, whether it is still
that file.

The identity is what ``stat`` gives: the device and inode (a file replaced by a rename,
as most tools save, is a new inode), the size and the modification time in nanoseconds
(a file rewritten in place). It costs one system call however large the file; a hash of
the content would cost a second full read of a file that is streamed because it is too
large to load. The cells themselves are checked by name as well where the outputs are
written (:func:`pyro_scvi.io.outputs.write_normalized`), so a rewrite that kept the size
and the modification time still cannot pair rows with the wrong cells.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputChanged


@dataclass(frozen=True)
class FileIdentity:
    """A file as ``stat`` saw it: path, device, inode, size and modification time (ns).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "in.h5ad"
    >>> _ = path.write_bytes(b"cells")
    >>> pinned = FileIdentity.of(path)
    >>> pinned.check()  # the same file: nothing raised
    >>> _ = path.write_bytes(b"other cells")
    >>> "size 5 -> 11 bytes" in pinned.changes()
    True
    >>> path.unlink()
    >>> pinned.changes()
    'it was deleted'
    """

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity:
        """The identity of the file at ``path`` now (``OSError`` if it cannot be read)."""
        st = os.stat(path)
        return cls(str(Path(path)), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changes(self) -> str | None:
        """What changed since the identity was taken, in words (``None``: nothing)."""
        try:
            now = FileIdentity.of(self.path)
        except FileNotFoundError:
            return "it was deleted"
        except OSError as err:
            return f"it can no longer be read ({err.strerror or err})"
        said = []
        if (now.device, now.inode) != (self.device, self.inode):
            said.append("it was replaced by another file")
        if now.size != self.size:
            said.append(f"size {self.size} -> {now.size} bytes")
        if now.mtime_ns != self.mtime_ns:
            said.append("modified since")
        return ", ".join(said) or None

    def check(self) -> None:
        """Raise :class:`~pyro_scvi.errors.InputChanged` unless the file is the one recorded."""
        what = self.changes()
        if what is not None:
            raise InputChanged(f"INPUT {self.path} changed while the run used it ({what})")
