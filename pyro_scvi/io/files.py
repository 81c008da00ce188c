"""Safe file output: check before work, write under temporary names, rename into place.

Three promises, for every file and folder the package writes:

- **Checked first.** :func:`check_output_file` and :func:`check_output_dir` find an output
  that cannot be written (a folder where a file is expected, a read-only or missing
  place, a folder holding someone else's files) before a long computation, and
  :func:`check_free_space` a disk too small for a conservative estimate of the outputs.
- **Never half-written.** A file is written to a temporary name beside its target and
  moved there with one ``rename`` (:func:`atomic_path`); a folder is built under a
  temporary name and exchanged with the old one in one ``rename`` where the system has
  ``renameat2(RENAME_EXCHANGE)`` (Linux: :func:`exchange`), else with two
  (:func:`replace_dir`). Temporary
  names carry the writer's process id, so a later run removes the leftovers of a process
  that was killed (:func:`sweep_stale`); every other exit removes them on the way out.
- **Never destroys what it did not write.** :func:`replace_dir` replaces a folder only
  when the caller's ``owned`` test recognizes it (for models: their manifest, see
  :mod:`pyro_scvi.io`), and puts it back if another process swapped in something else.

Outputs that belong together (fit's ``.h5ad``, model folder and curves; ppc's files) are
written under temporary names and moved in by :func:`publish` as one set: under an
exclusive lock on their folders (:func:`publish_lock`), so that of two processes finishing
at once one wins whole, and with SIGINT and SIGTERM held until the moves are done
(:func:`deferred_signals`). HDF5 files are written through :func:`h5_file`, which keeps a
full disk from ever reaching HDF5 (where it can crash the process) and raises it as one
:class:`OSError` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputError

#: Marks the temporary names this package writes: ``.NAME.pyro_scvi-tmp-PID-TOKEN``.
TMP_TAG = ".pyro_scvi-tmp"


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside ``path``, tagged with this process's id.

    Examples
    --------
    >>> name = temp_name("/data/out.h5ad").name
    >>> name.startswith(".out.h5ad.pyro_scvi-tmp-") and name.endswith(".h5ad")
    True
    """
    path = Path(path)
    return path.with_name(
        f".{path.name}{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists, owned by someone else
        return True
    return True


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run; return them.

    Only names of the form :func:`temp_name` gives, for this very target, are touched, and
    only when their process id is gone (a killed run: SIGKILL, a power cut).
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}{TMP_TAG}-") + r"(\d+)-[0-9a-f]{8}")
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            remove_path(entry)
            removed.append(entry)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file, link or folder at ``path``; nothing there is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``; raise :class:`OutputError` if refused.

    A real attempt, not ``os.access``: it also catches a read-only mount, and runs as the
    same user with the same ACLs as the write that follows.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".probe{TMP_TAG}-{os.getpid()}-", dir=directory)
    except OSError as err:
        raise OutputError(
            f"cannot write in {directory} ({err.strerror or err}); choose a writable place."
        ) from err
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | os.PathLike, *, what: str = "output") -> None:
    """Check that ``path`` can be written as a file: not a folder, in a writable place.

    Missing parent folders are fine (they are created on writing) if the nearest existing
    one is writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name.")
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise OutputError(f"{what} {path}: {anchor} is a file, not a folder.")
    _probe(anchor)


def check_output_dir(
    path: str | os.PathLike,
    *,
    owned: Callable[[Path], bool],
    what: str = "model folder",
    protect: Iterable[str | os.PathLike] = (),
) -> None:
    """Check that ``path`` can be (re)written as a folder this package owns.

    Parameters
    ----------
    path
        The folder.
    owned
        Recognizes a folder this package wrote (e.g. :func:`pyro_scvi.io.is_model_dir`);
        an existing folder is replaced only if it is owned or empty.
    what
        Its name in messages.
    protect
        Files that must not end up inside it or be it (the input, the other outputs).

    The current folder (``"."``), or one holding it, is refused: the folder written
    replaces it whole.
    """
    path = Path(path)
    here = Path(os.path.abspath(path))
    cwd, real = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(path))
    if real == cwd or real in cwd.parents:
        # The folder is replaced whole (built beside it, renamed over it): the current
        # folder would vanish from under the user's shell, and "." has no name to build
        # beside.
        raise OutputError(
            f"{what} {path} is the current folder{'' if real == cwd else ' or holds it'}, "
            "and it is replaced whole by the folder written; name a new folder instead, such "
            f"as {path / ('checkpoint' if 'checkpoint' in what else 'model')}."
        )
    for other in protect:
        other_abs = Path(os.path.abspath(other))
        if other_abs == here or here in other_abs.parents:
            raise OutputError(
                f"{what} {path} would hold or replace {other}; choose another folder."
            )
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; pass the folder it points to.")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{what} {path} is a file, not a folder; choose another path.")
        if not owned(path) and any(path.iterdir()):
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise OutputError(
                f"{what} {path} holds files that pyro_scvi did not write ({shown}); it only "
                "replaces a folder holding one of its own models. Choose a new folder."
            )
    _probe(_existing_ancestor(path.parent))


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or would hold it)."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def check_free_space(needs: dict[str | os.PathLike, int], *, margin: float = 1.25) -> None:
    """Check that each file system has room for what ``needs`` writes to it.

    ``needs`` maps target paths to estimated bytes; estimates on one file system add up.
    ``margin`` (and 8 MB) covers the estimates' error. A full disk found here costs
    nothing; found by HDF5 half-way through a write it can crash the process.
    """
    by_device: dict[int, list] = {}
    for target, n_bytes in needs.items():
        # the folder that holds it, where its temporary is written and renamed: a target
        # itself can vanish meanwhile (another run moving its own outputs in)
        anchor = _existing_ancestor(Path(target).parent)
        entry = by_device.setdefault(anchor.stat().st_dev, [anchor, 0, []])
        entry[1] += int(n_bytes)
        entry[2].append(str(target))
    for anchor, n_bytes, targets in by_device.values():
        want = int(n_bytes * margin) + 8 * 2**20
        have = free_bytes(anchor)
        if have < want:
            raise OutputError(
                f"not enough free space for {', '.join(targets)}: they need about "
                f"{_mb(want)} (an estimate with margin) and {_mb(have)} are free on the disk "
                f"holding {anchor}; free some space or write elsewhere."
            )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


@contextmanager
def atomic_path(path: str | os.PathLike, *, min_free: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    ``min_free`` bytes (an estimate of the file's size) are checked to be free first. The
    temporary file is removed on any exit.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(out) as tmp:
    ...     _ = tmp.write_text("done")
    >>> out.read_text(), sorted(p.name for p in out.parent.iterdir())
    ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    if min_free:
        check_free_space({path: min_free})
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.exists():
            # Give the permissions a new file would have (mkstemp-style files are private).
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def make_temp_dir(target: str | os.PathLike) -> Path:
    """Create an empty folder under a temporary name beside ``target``; return it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = temp_name(target)
    tmp.mkdir(mode=0o777 & ~current_umask())
    return tmp


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic rename, where the system can.

    One ``renameat2(RENAME_EXCHANGE)`` call (Linux 3.15 and later, on most local file
    systems): no process ever finds either name missing, or naming anything but the old or
    the new entry. :func:`replace_dir` exchanges a finished folder with the one it replaces
    this way, and falls back to two renames where this returns ``False``.

    Parameters
    ----------
    a, b
        Two existing files or folders, on one file system.

    Returns
    -------
    bool
        ``True`` once swapped; ``False``, with nothing changed, where the system or the file
        system has no atomic exchange.

    Raises
    ------
    OSError
        When the exchange is supported but fails (e.g. ``FileNotFoundError``).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "a").write_text("old"), (d / "b").write_text("new")
    >>> swapped = exchange(d / "a", d / "b")
    >>> (d / "a").read_text() == ("new" if swapped else "old")
    True
    >>> shutil.rmtree(d)
    """
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel or a file system without it
    raise OSError(code, os.strerror(code), str(b))


_LIBC: object | None = None


def _libc() -> object:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except (OSError, TypeError):  # e.g. Windows: no C library to open by that name
            _LIBC = object()  # has no renameat2: the two-rename fallback runs
    return _LIBC


def replace_dir(
    tmp: str | os.PathLike,
    target: str | os.PathLike,
    *,
    owned: Callable[[Path], bool],
    attempts: int = 20,
) -> None:
    """Move the folder ``tmp`` to ``target``, replacing an owned (or empty) folder there.

    Where the system can, the two folders are exchanged in one atomic rename and the old
    one is deleted afterwards, so ``target`` always names a complete folder, old or new;
    elsewhere the old folder is renamed aside first (two renames). Concurrent writers of
    one ``target`` each end with a complete folder in place (the last one's), never an
    error; if what was swapped out is not owned (another program wrote there meanwhile),
    it is put back and :class:`OutputError` is raised.
    """
    tmp, target = Path(tmp), Path(target)
    for _ in range(attempts):
        if not os.path.lexists(target):
            try:
                os.rename(tmp, target)
                return
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # another writer got there first: replace its folder instead
        if target.is_symlink() or not target.is_dir():
            raise OutputError(f"{target} is not a folder; it was not replaced.")
        if not (owned(target) or not any(target.iterdir())):
            raise OutputError(
                f"{target} holds files that pyro_scvi did not write; it was not replaced."
            )
        try:
            swapped = exchange(tmp, target)
        except FileNotFoundError:
            continue  # another writer moved it away meanwhile
        if swapped:
            # tmp now names the old folder
            if not (owned(tmp) or not any(tmp.iterdir())):
                exchange(tmp, target)
                raise OutputError(
                    f"{target} was changed by another program while writing; it was not replaced."
                )
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = temp_name(target)
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, target)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise OutputError(f"could not replace {target}: other processes kept writing it.")


def current_umask() -> int:
    """The process's umask, read without changing it (for modes of files made by hand)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------ publishing a set of outputs
#: The signals :func:`deferred_signals` holds.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred_signals(signums: Sequence[int] = STOP_SIGNALS) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while the block runs, and deliver them when it ends.

    For short steps that must not stop half-way (a few renames, moving a model folder
    into place): a signal received meanwhile is recorded in the yielded list and sent
    again to the process once the previous handlers are back, so it then acts as it
    would have (raises :class:`KeyboardInterrupt`, ends the process, ...), just later.
    Outside the main thread (where Python cannot handle signals) nothing changes.

    Examples
    --------
    >>> seen = []
    >>> try:
    ...     with deferred_signals() as held:
    ...         signal.raise_signal(signal.SIGINT)  # held, not raised here
    ...         seen.append(list(held))
    ... except KeyboardInterrupt:
    ...     seen.append("raised after the block")
    >>> seen
    [[2], 'raised after the block']
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []

    def hold(signum, frame):
        received.append(signum)

    previous = {}
    for signum in signums:
        previous[signum] = signal.signal(signum, hold)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            # None: a handler not set from Python, which Python cannot put back
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])


@contextmanager
def publish_lock(*targets: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the folders of ``targets`` while the block runs.

    An advisory ``flock`` on each folder itself (no lock file is left behind), taken in a
    fixed order so that two processes locking the same folders never wait on each other.
    Every :func:`publish` takes it, so that two processes publishing to the same outputs
    take turns. Where the system has no ``flock`` (Windows) or the folder refuses it
    (some network file systems), the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folders = sorted({os.path.realpath(_existing_ancestor(Path(t).parent)) for t in targets})
    fds = []
    try:
        for folder in folders:
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # not supported here: go on without
                pass
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing the last descriptor releases the lock


def publish(
    files: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    *,
    folders: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (),
    owned: Callable[[Path], bool] = lambda path: False,
) -> None:
    """Move finished temporaries to their targets as one set; the last file names the set.

    ``files`` and ``folders`` are ``(temporary, target)`` pairs. The last file (e.g. fit's
    ``.h5ad``) is the one readers look for: an old one is moved aside first and the new one
    comes in last, so at no moment does it sit beside members of another set; if nothing
    of the new set could be moved in, the old one is put back. Folders are replaced with
    :func:`replace_dir` (``owned`` as there). It all runs under :func:`publish_lock` (two
    processes publishing the same targets take turns, so the set in place is one
    process's) and :func:`deferred_signals` (a signal waits for the renames).

    Examples
    --------
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("a.csv", "a.nc"):
    ...     _ = temp_name(d / name).write_text("new")
    >>> publish([(p, d / p.name.split(TMP_TAG)[0][1:]) for p in sorted(d.iterdir())])
    >>> sorted(p.name for p in d.iterdir())
    ['a.csv', 'a.nc']
    >>> shutil.rmtree(d)
    """
    pairs = [(Path(tmp), Path(target)) for tmp, target in files]
    dirs = [(Path(tmp), Path(target)) for tmp, target in folders]
    *others, (key_tmp, key) = pairs
    targets = [target for _, target in [*pairs, *dirs]]
    with deferred_signals(), publish_lock(*targets):
        aside, moved = None, False
        try:
            if os.path.lexists(key):
                aside = temp_name(key)
                os.replace(key, aside)
            for tmp, target in dirs:
                replace_dir(tmp, target, owned=owned)
                moved = True
            for tmp, target in others:
                os.replace(tmp, target)
                moved = True
            os.replace(key_tmp, key)
        finally:
            if aside is not None:
                if not moved and not os.path.lexists(key):
                    os.replace(aside, key)  # nothing new moved in: the old set stays whole
                else:
                    remove_path(aside)  # it no longer belongs beside what moved in


# --------------------------------------------------------------- HDF5 on a full disk
class _GuardedFile:
    """A file object for h5py's ``fileobj`` driver on which HDF5 never sees a failed write.

    The first write that fails (a full disk, a file size limit) is recorded in ``error``,
    and from then on writes are accepted and dropped, the file's end kept as HDF5 expects
    it: HDF5 closes the file cleanly, and :func:`h5_file` raises ``error``. (HDF5 given the
    error itself leaves a half-flushed file open, whose finalizers can crash the process.)
    """

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        # unbuffered, as HDF5's own driver: a write fails where it is made, never later in
        # a seek or read that flushes a buffer
        self.file = open(path, mode, buffering=0)  # noqa: SIM115 - closed by h5_file
        self.error: OSError | None = None
        self.virtual_end = 0

    def _fail(self, err: OSError) -> None:
        if self.error is None:
            self.error = err if err.filename else OSError(err.errno, err.strerror, str(self.path))

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2 and self.error is not None:
            end = max(self.virtual_end, os.fstat(self.file.fileno()).st_size)
            return self.file.seek(end + offset)
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = 0
        while n < len(view):
            got = self.file.readinto(view[n:])
            if not got:
                break
            n += got
        if self.error is not None and n < len(view):  # past what reached the disk
            view[n:] = bytes(len(view) - n)
            n = len(view)
        return n

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        start, done = self.file.tell(), 0
        if self.error is None:
            try:
                while done < len(view):
                    done += self.file.write(view[done:])
                return done
            except OSError as err:
                self._fail(err)
        self.virtual_end = max(self.virtual_end, start + len(view))
        self.file.seek(start + len(view))
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as err:
                self._fail(err)
        self.virtual_end = self.file.tell() if size is None else size
        return self.virtual_end

    def flush(self) -> None:
        pass  # unbuffered

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as err:
            self._fail(err)


@contextmanager
def h5_file(path: str | os.PathLike, mode: str = "r+") -> Iterator[Any]:
    """Open the HDF5 file ``path`` (``mode`` ``"w"`` or ``"r+"``) so that a full disk is safe.

    Yields an ``h5py.File``. A write that fails (``ENOSPC``, ``EFBIG``, ...) never reaches
    HDF5 (see ``_GuardedFile``): the file is closed cleanly and the first failure is
    raised as :class:`OSError` when the block ends, whatever HDF5 made of the dropped
    writes meanwhile. The file is then garbage; the caller, who wrote it under a
    temporary name, removes it.

    Examples
    --------
    >>> import numpy as np
    >>> out = Path(tempfile.mkdtemp()) / "a.h5"
    >>> with h5_file(out, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(3))
    >>> with h5_file(out) as f:
    ...     f["x"][:].tolist()
    [0, 1, 2]
    """
    import h5py

    if mode not in ("w", "r+"):
        raise ValueError(f"h5_file writes; mode must be 'w' or 'r+', not {mode!r}")
    guard = _GuardedFile(Path(path), "w+b" if mode == "w" else "r+b")
    try:
        with h5py.File(guard, mode) as f:
            yield f
    except Exception as err:
        guard.close()
        if guard.error is not None:  # what HDF5 made of the dropped writes: the disk's fault
            raise guard.error from err
        raise
    except BaseException:
        guard.close()
        raise
    guard.close()
    if guard.error is not None:
        raise guard.error
