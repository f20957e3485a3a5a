"""Root-safe file access under the state and spool folders: never follow a link certbatch did not
make, never trust a file or folder it does not own.

The model is OpenSSH's StrictModes and Postfix's safe_open: a tree is safe to use by path when
every folder in it is a real folder (not a symlink), owned by the user certbatch runs as, and not
writable by group or others, and when the folders leading to it cannot be changed by anybody
else either. Then nobody but that user (and root) can swap a folder for a link between a check
and its use, so certbatch checks each of its folders once when it first uses it and opens files
with O_NOFOLLOW, checking what it opened (a regular file, ours, one link) on the descriptor. A
file opened only for reading may have more links: a staged certificate's files are hard links to
the stored ones (the spool's `_seal`), and in folders nobody else can write to, only certbatch
(or root) can have made them.

Everything here raises UnsafePath (a StoreError) naming the path and what is wrong.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UnsafePath

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _who(uid: int) -> str:
    import pwd  # only on the error path

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def problem(st: os.stat_result, kind: str = "folder", links_ok: bool = False) -> str | None:
    """Why a file or folder with this lstat result is not certbatch's own, or None.
    `links_ok`: a file may have several hard links (it is only read)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink (certbatch never follows links in its own folders)"
    want = stat.S_ISDIR if kind == "folder" else stat.S_ISREG
    if not want(st.st_mode):
        return f"is not a {'folder' if kind == 'folder' else 'regular file'}"
    if st.st_uid != os.geteuid():
        return f"is owned by {_who(st.st_uid)}, not by {_who(os.geteuid())} who runs certbatch"
    if st.st_mode & 0o022:
        return f"is writable by {'others' if st.st_mode & 0o002 else 'group'} " \
               f"(mode {stat.S_IMODE(st.st_mode):04o})"
    if kind == "file" and st.st_nlink != 1 and not links_ok:
        return f"has {st.st_nlink} hard links"
    return None


def _lstat(path: Path | str) -> os.stat_result:
    """lstat; FileNotFoundError as is, any other OS error as UnsafePath naming the path."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnsafePath(path, f"cannot be examined: {exc.strerror}") from exc


def check_dir(path: Path | str) -> None:
    """Raise UnsafePath unless `path` is certbatch's own folder (see the module doc)."""
    why = problem(_lstat(path))
    if why:
        raise UnsafePath(path, why + ("; chmod go-w it" if "writable" in why else ""))


def check_links(path: Path) -> None:
    """Every symlink on the way to `path` (as written) must be root's or ours: one made by
    another user (in a sticky /tmp, say) could be pointed elsewhere at any time."""
    current = Path("/")
    for part in Path(os.path.abspath(path)).parts[1:]:
        current = current / part
        try:
            st = _lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.geteuid()):
            raise UnsafePath(current, f"is a symlink owned by {_who(st.st_uid)}: another user "
                                      f"could point it elsewhere")


def check_parents(path: Path) -> None:
    """The folders leading to `path` must not be changeable by another user: each is owned by
    root or by us, and writable by others only with the sticky bit (like /tmp). They are the
    real folders (symlinks resolved, each checked by check_links)."""
    check_links(path)
    for parent in Path(os.path.realpath(path)).parents:
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise UnsafePath(parent, f"cannot be examined: {exc.strerror}") from exc
        if st.st_uid not in (0, os.geteuid()):
            raise UnsafePath(parent, f"is owned by {_who(st.st_uid)}: another user could swap "
                                     f"what is inside it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(parent, f"is writable by group or others without the sticky bit "
                                     f"(mode {stat.S_IMODE(st.st_mode):04o})")


def check_root(path: Path) -> None:
    """A state or spool root that exists: ours, not writable by others, and so is the way to it.

    The root itself may be reached through a symlink the operator made (paths.state pointing at
    /srv/...): what counts is the folder it names.
    """
    check_parents(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnsafePath(path, f"cannot be examined: {exc.strerror}") from exc
    why = problem(st)
    if why and st.st_mode & 0o002 and stat.S_ISDIR(st.st_mode):
        why += (f": a shared folder; point certbatch at a folder of its own inside it (e.g. "
                f"{Path(path) / 'certbatch'}, which it creates 0700)")
        raise UnsafePath(path, why)
    if why:
        raise UnsafePath(path, why + ("; chmod go-w it" if "writable" in why else ""))


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` with `mode` whatever the umask, or check that the existing one is ours.

    Only the last component is created: its parent must exist (certbatch's own folders are made
    top down, each checked).
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        check_dir(path)
        return path
    os.chmod(path, mode, follow_symlinks=False)  # mkdir's mode is filtered by the umask
    return path


def open_file(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open one of certbatch's own files without following a link; check it on the descriptor.

    With O_CREAT the file may be new (created with `mode`). Raises UnsafePath if the path is a
    symlink or the file is not a regular file of ours with one link (any number of links when
    it is only read: nothing is written through another name).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: O_NOFOLLOW met a symlink
            raise UnsafePath(path, "is a symlink (certbatch never follows links in its own "
                                   "folders)") from exc
        raise
    try:
        read_only = flags & (os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND) == os.O_RDONLY
        why = problem(os.fstat(fd), "file", links_ok=read_only)
        if why:
            raise UnsafePath(path, why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path | str) -> bytes:
    """The content of one of certbatch's own files (see open_file)."""
    fd = open_file(path)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def read_text(path: Path | str) -> str:
    return read_bytes(path).decode()
