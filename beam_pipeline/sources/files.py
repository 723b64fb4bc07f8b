"""Which files a run reads, and how one is opened.

Local folders are walked here rather than by Beam's ``MatchFiles``: symlinked folders outside the
input are followed (links to folders inside it are not: their files are listed under their real
path), dangling links are listed so that they become error lines, the output folder is never read
back when it lies inside the input, and a file name that is not valid UTF-8 is carried as
``bytes`` (Beam's string coder cannot encode it). ``gs://`` prefixes are listed page by page
through the JSON API (``gcs.list_objects``). A listing is two steps, so that a pipeline can fan
it out: ``list_top`` (the root's own files and its parts: subfolders or sub-prefixes), then
``list_part`` of each part; ``list_files`` is the two in series. Globs mean what they mean to Beam's
``FileSystems``: ``*`` and ``?`` stay inside one folder, ``**`` crosses folders.
"""
from __future__ import annotations

import errno
import glob as globlib
import operator
import os
import pathlib
import re
import stat
import threading
import warnings
from typing import Iterator
from urllib.parse import quote

Path = str | bytes  # bytes only for local names that are not valid UTF-8
# A listed file: (path, size or None, version or None); the version is the gs:// generation (local
# files have none: ``stamp`` takes their modification time when they are read).
Listed = tuple[Path, int | None, str | None]


def is_remote(path: str) -> bool:
    return "://" in path


def portable(path: str) -> Path:
    """``path`` itself, or its raw bytes when it holds undecodable bytes (surrogate escapes)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def display_path(path: Path) -> str:
    """A printable, valid-UTF-8 form of a path: undecodable bytes shown as ``\\xNN``."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return path


def resolve_pattern(input_path: str) -> str:
    """A directory (local or bucket prefix) becomes a recursive glob; a glob or file stays as is.
    Local paths become absolute, so that matched paths and folder keys agree."""
    if not is_remote(input_path):
        input_path = os.path.abspath(input_path)
        if os.path.isdir(input_path):  # walked whatever its name: "Study [2020]" is no glob
            return os.path.join(globlib.escape(input_path), "**")
        return input_path if globlib.has_magic(input_path) else globlib.escape(input_path)
    if globlib.has_magic(input_path):
        return input_path
    from beam_pipeline.sources import gcs

    if input_path.endswith("/") or not gcs.object_exists(input_path):
        return input_path.rstrip("/") + "/**"
    return input_path


def group_root(input_path: str) -> str:
    """The folder whose first-level subfolders are studies in ``--group-by directory`` mode."""
    root = input_path if is_remote(input_path) else os.path.abspath(input_path)
    if not is_remote(root) and os.path.isdir(root):
        return root.rstrip("/")
    while globlib.has_magic(root):
        root = root.rsplit("/", 1)[0]
    return root.rstrip("/")


def root_uri(pattern: str) -> str:
    """The root of a resolved input pattern (``resolve_pattern``) as a URI: ``file://`` and the folder
    given (a glob's fixed folders, a single file's folder), or ``gs://bucket/prefix``. Never a file
    name nor a folder below the root, whose names may be patients' names."""
    root = _literal_root(pattern)
    if is_remote(root):
        scheme, rest = root.split("://", 1)
        return f"{scheme}://{quote(rest, safe='/')}"
    return pathlib.PurePosixPath(root).as_uri()


def first_level_folder(path: Path, root: str) -> str:
    """Key of a file in directory mode: its first-level folder under root (files at the top: root)."""
    path, root = display_path(path), display_path(portable(root))
    relative = path[len(root):].lstrip("/") if path.startswith(root) else path
    parts = relative.split("/")
    return root + "/" + parts[0] if len(parts) > 1 else root


def list_files(pattern: str, exclude: str | None = None,
               retry_deadline: float | None = None) -> Iterator[Listed]:
    """(path, size or None, version or None) of every file the resolved pattern matches, in a stable order: the
    serial form of the fanned-out listing (``list_top``, then ``list_part`` of each part), so the
    two list the same files by construction."""
    files, parts = list_top(pattern, exclude, retry_deadline)
    yield from files
    lister = PartLister(pattern, exclude, retry_deadline)
    for part in parts:
        yield from lister.files(part)


def list_top(pattern: str, exclude: str | None = None,
             retry_deadline: float | None = None) -> tuple[list[Listed], list[Path]]:
    """The first step of a listing: the matching files directly in the pattern's literal root, and
    its parts to list next (in parallel): its subfolders, or on gs:// its sub-prefixes.

    A root that cannot be listed is itself a "file": the reader makes it one error line.
    A symbolic link to a folder is a part only when its target lies outside the input folder
    (see ``_entries``)."""
    if is_remote(pattern):
        from beam_pipeline.sources import gcs

        bucket, _ = gcs.split_path(pattern)
        matches = _matcher(pattern)
        files, parts = [], []
        for path, size, version in gcs.list_objects(bucket, gcs.fixed_prefix(pattern), delimiter="/",
                                                    policy=retry_policy(retry_deadline)):
            if path.endswith("/") and size is None:
                parts.append(path)
            elif matches(path):
                files.append((path, size, version))
        return sorted(files), sorted(parts)
    if not globlib.has_magic(pattern):  # one file (escaped or plain)
        path = _unescape(pattern)
        return ([(portable(path), None, None)] if os.path.lexists(path) else []), []
    root = _literal_root(pattern)
    matches = _matcher(pattern)
    entries, folders = _entries(root, os.path.realpath(root), _excluded(exclude))
    if entries is None:
        return [(portable(root), None, None)], []
    return [(portable(path), None, None) for path in entries if matches(path)], [portable(path) for path in folders]


def list_part(pattern: str, part: Path, exclude: str | None = None,
              retry_deadline: float | None = None) -> Iterator[Listed]:
    """The files the pattern matches in one part of ``list_top`` (a subfolder, a sub-prefix), in a
    stable order. A gs:// list page still failing past the retry deadline raises
    ``SourceUnavailable``; a local folder that cannot be listed is yielded as a "file"."""
    return PartLister(pattern, exclude, retry_deadline).files(part)


class PartLister:
    """Lists the parts of one resolved pattern (``list_part``): what every part needs (the pattern's
    matcher, the input folder's real path, the excluded folder's) worked out once, so that a
    worker listing thousands of small parts does not work it out for each."""

    def __init__(self, pattern: str, exclude: str | None = None, retry_deadline: float | None = None):
        self.remote = is_remote(pattern)
        self.retry_deadline = retry_deadline
        self.matches = _matcher(pattern)
        if not self.remote:
            root = _literal_root(pattern)
            # A whole folder (``resolve_pattern``): every path under it matches, no test per path.
            if pattern == os.path.join(globlib.escape(root), "**"):
                self.matches = None
            self.could_hold = _folder_matcher(pattern)
            self.root_real = os.path.realpath(root)
            self.excluded = _excluded(exclude)

    def files(self, part: Path) -> Iterator[Listed]:
        """The files of one part (``list_part``)."""
        if self.remote:
            from beam_pipeline.sources import gcs

            bucket, prefix = gcs.split_path(part)
            matches = self.matches
            listed = gcs.list_objects(bucket, prefix, policy=retry_policy(self.retry_deadline))
            yield from sorted(item for item in listed if matches(item[0]))
            return
        for paths, _ in self.folders(part):
            for path in paths:
                yield path, None, None

    def folders(self, part: Path) -> Iterator[tuple[list[Path], list[str] | None]]:
        """The files of one local part, a folder at a time in ``files``' order: (its matching
        files (``portable``), the subfolders the walk enters from it), or ([a folder], None) when
        it cannot be listed and the pattern could match files under it (the reader makes it one
        error line); never an empty list of files.
        Each folder's files come in one list: only a subfolder that cannot be listed is listed
        later as a "file" of the folder."""
        matches, could_hold = self.matches, self.could_hold
        for paths, subfolders in _walk(os.fsdecode(part), self.excluded, self.root_real):
            if matches is not None:
                if subfolders is None:  # a folder that cannot be listed: an error if it could hide matches
                    paths = [path for path in paths if matches(path) or could_hold(path)]
                else:
                    paths = [path for path in paths if matches(path)]
            if paths:
                yield [path if path.isascii() else portable(path) for path in paths], subfolders


def retry_policy(retry_deadline: float | None = None):
    """The storage retry policy with the run's --retry-deadline (None: the default deadline)."""
    from beam_pipeline.sources import retry

    return retry.RetryPolicy() if retry_deadline is None else retry.RetryPolicy(deadline=retry_deadline)


def _matcher(pattern: str):
    with warnings.catch_warnings():  # glob.escape's "[[]" reads to re as a possible nested set
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(glob_regex(pattern)).fullmatch


def _folder_matcher(pattern: str):
    """Whether files under a local folder could match the glob: the folder's path matches the
    pattern's leading folders, to any depth from the first part that can match a ``/`` (``**``;
    ``?`` and a negated set, as ``glob_regex`` reads them), the files' part included. A folder
    that cannot be listed is an error line when it could hide matching files, and nothing when
    the pattern cannot reach into it."""
    parts = pattern.split("/")  # the last part names the files
    tests = []
    for part in parts[:-1]:
        if _crosses_folders(part):
            break
        tests.append(_matcher(part))
    deep = len(tests) < len(parts) - 1 or _crosses_folders(parts[-1])

    def could_hold(path: str) -> bool:
        names = path.split("/")
        return (deep or len(names) <= len(tests)) and all(map(lambda test, name: test(name), tests, names))

    return could_hold


def _crosses_folders(part: str) -> bool:
    """Whether a part of a glob can match a ``/`` (conservatively: an escaped ``[?]`` counts)."""
    return "**" in part or "?" in part or "[!" in part


def _excluded(exclude: str | None) -> str | None:
    return os.path.realpath(exclude) if exclude and not is_remote(exclude) else None


def glob_regex(pattern: str) -> str:
    """A regex for a glob: ``**`` any characters, ``*`` any but ``/``, ``?`` one, ``[...]`` a set
    (``[!...]`` negated), as Beam's ``FileSystem.translate_pattern`` reads them."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if i < n and pattern[i] == "*":
                out.append(".*")
                i += 1
            else:
                out.append(r"[^/\\]*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(r"\[")
                continue
            members = pattern[i:j].replace("\\", "\\\\")
            i = j + 1
            if members[0] == "!":
                members = "^" + members[1:]
            elif members[0] == "^":
                members = "\\" + members
            out.append(f"[{members}]")
        else:
            out.append(re.escape(char))
    return "(?ms)" + "".join(out) + r"\Z"


def _literal_root(pattern: str) -> str:
    """The longest leading folder of a glob without magic characters (unescaped)."""
    parts = pattern.split("/")
    literal = []
    for part in parts[:-1]:
        if globlib.has_magic(part.replace("[[]", "").replace("[]]", "").replace("[*]", "")
                             .replace("[?]", "")):
            break
        literal.append(part)
    return _unescape("/".join(literal) or "/")


def _unescape(text: str) -> str:
    return re.sub(r"\[([*?\[\]])\]", r"\1", text)


def _entries(folder: str, root_real: str, excluded: str | None,
             excluded_name: str | None = None) -> tuple[list[str] | None, list[str]]:
    """(paths of the folder's non-folder entries, its folders to enter), sorted by name; (None, [])
    when the folder cannot be listed. Files, special files and dangling links are all entries: the
    reader classifies them.

    The walk enters a folder, or a symbolic link to a folder outside the input folder. A link to a
    folder inside the input folder is not followed (it is left out): its files are listed once,
    under their real path, whichever part of the listing reaches them first (the rule that keeps a
    fanned-out listing equal to a serial one, and loops through the input impossible). The
    excluded folder (the output's) is never entered."""
    try:
        with os.scandir(folder) as scan:
            scanned = sorted(scan, key=_NAME)
    except OSError:
        return None, []
    files, folders = [], []
    if excluded and excluded_name is None:
        excluded_name = os.path.basename(excluded)
    inside = root_real.rstrip("/") + "/"
    for entry in scanned:
        try:
            is_folder = entry.is_dir()  # follows links; a system call for links only
        except OSError:
            is_folder = False
        if not is_folder:
            files.append(entry.path)
        elif entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not (target == root_real or target.startswith(inside) or target == excluded):
                folders.append(entry.path)
        # Only a folder of the excluded folder's name can be it: no realpath per folder.
        elif not (entry.name == excluded_name and os.path.realpath(entry.path) == excluded):
            folders.append(entry.path)
    return files, folders


_NAME = operator.attrgetter("name")


def _walk(top: str, excluded: str | None, root_real: str) -> Iterator[tuple[list[str], list[str] | None]]:
    """The files under one folder of the input, a folder at a time: (the folder's files sorted by
    name, the subfolders entered from it), its subfolders next in name order; entering subfolders
    and links to folders outside the input (each folder once: loop-safe); dangling links too, and
    ([a folder that cannot be listed], None) (the reader makes each of these one error line, so
    nothing under them vanishes without a trace). A folder without files gives no list.

    Every folder's identity (``stat``) is checked, not only a link's: a link to a folder that holds
    the input, or a bind mount, leads back to a folder of the part with no link to tell."""
    seen: set[tuple[int, int]] = set()
    excluded_name = os.path.basename(excluded) if excluded else None
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            yield [folder], None
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue  # a folder already walked in this part, reached again (a link, a bind mount)
        seen.add((info.st_dev, info.st_ino))
        files, folders = _entries(folder, root_real, excluded, excluded_name)
        if files is None:
            yield [folder], None
            continue
        if files:
            yield files, folders
        stack.extend(reversed(folders))


class InputOpener:
    """Opens input files for header reading, one per worker: ``gs://`` objects by ranged GETs over
    kept-alive connections (set up on the first gs:// path, so local runs need no credentials), local
    files directly. ``limit`` (a ``retry.AdaptiveLimit``, shared by a worker's readers) bounds the
    gs:// requests in flight and shrinks while the store throttles."""

    def __init__(self, retry_deadline: float | None = None, limit=None):
        self.retry_deadline = retry_deadline  # None: gcs.DEFAULT_RETRY_DEADLINE
        self.limit = limit
        self._fetcher = None
        self._lock = threading.Lock()

    def __call__(self, path: Path, size: int | None = None):
        if isinstance(path, str) and path.startswith("gs://"):
            from beam_pipeline.sources import gcs

            return gcs.open_ranged(self._gcs_fetcher(), path, size=size)
        if isinstance(path, str) and is_remote(path):
            raise OSError(errno.EPROTONOSUPPORT, "only local files and gs:// objects can be read")
        return open(path, "rb")

    def _gcs_fetcher(self):
        with self._lock:
            if self._fetcher is None:
                from beam_pipeline.sources import gcs

                self._fetcher = gcs.RangeFetcher(policy=retry_policy(self.retry_deadline), limit=self.limit)
            return self._fetcher


def stamp(path: Path, size: int | None = None, version: str | None = None) -> str | None:
    """What says a file is unchanged since an earlier run: size and modification time (ns) of a
    local file (of a link's target), size and generation of a gs:// object; None when unknown (the
    file is then always read)."""
    if isinstance(path, str) and is_remote(path):
        return f"{size}:g{version}" if version is not None and size is not None else None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}" if stat.S_ISREG(info.st_mode) else None


def local_file_problem(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when a local path is not a regular file that can be read, else None."""
    from beam_pipeline.codes import Reason

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return Reason.DANGLING_SYMLINK, "symbolic link to a file that does not exist"
        raise
    if stat.S_ISDIR(mode):  # listed by the walker because it could not be listed itself
        return Reason.UNREADABLE, "a folder whose entries cannot be listed"
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        return Reason.NOT_A_REGULAR_FILE, "a FIFO, socket or device file is not read"
    return None
