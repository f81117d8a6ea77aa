"""Build, cache and load the C++ kernel of ``impl="cpp"`` (``cpu_kernel.cpp``), trusting only what
this user built.

The library is built at first use with the system's C++ compiler (``$CXX``, else ``g++``, else
``c++``) for this CPU (``-march=native``) and cached in ``$LION_HF_CACHE``, else
``$XDG_CACHE_HOME/lion_hf`` or ``~/.cache/lion_hf``. Its file name hashes everything the build
depends on: the source, the compiler (its resolved path, size and modification time, so that no
compiler runs just to look a library up), the flags and the CPU's feature flags.

Trust model (docs/implementations.md says it for users):

* A cache folder is used only if this user owns it and neither group nor others can write to it;
  it is created with mode 0700. Any other folder (a shared ``/tmp`` path, a folder another user
  planted or made world-writable) is refused with a warning naming it, and the library is built
  into a fresh private folder of this process instead.
* A library is loaded only if this user owns it, nobody else can write to it, its SHA-256
  matches the one recorded beside it when it was built, and it is a whole ELF file: every
  segment the loader maps lies inside it. (A library cut short by a compiler wrapper or a full
  disk that still reported success has a record that describes the short file; the loader would
  map past its end and the process die with SIGBUS.) The file is opened once and read whole
  through that descriptor, and the bytes checked are loaded from a sealed in-memory copy (Linux
  ``memfd``; elsewhere a private temporary file): nothing can swap them between the check and
  the load, and another process cutting or overwriting the cached file later (a ``cp`` over it)
  cannot reach what this process has mapped.
* A library that fails any check (truncated, corrupt, foreign, without its record) or fails to
  load is deleted and rebuilt once; if that fails too, the cpp impl is unavailable in this
  process and the step runs in ``foreach``, with a warning. Nothing is loaded unchecked, and a
  bad cache never crashes the process.
* Time limits: the build gets :data:`BUILD_TIMEOUT_S` seconds, after which the compiler's whole
  process group is killed; so is it when the build is interrupted (KeyboardInterrupt,
  SystemExit). No wait is without a limit: the compiler writes its messages into an unnamed temporary
  file, not a pipe (a process it left behind in another session, a compile server, cannot keep
  the build waiting for the pipe to close), and a compiler that does not die within
  :data:`KILL_WAIT_S` seconds of the kill is abandoned with an error. On Linux the compiler runs
  under a small guard process that kills the compiler's whole process group (the driver and its
  cc1plus, as, ld) when the process that started the build dies, SIGKILL and the OOM killer
  included.
* Temporaries: each build works in a folder of its own in the cache folder, named
  ``.lion_hf_build.<host>.<pid>.<thread>.<random>`` (the compiler's own temporary files go there
  too, through ``TMPDIR``), and renames the finished library and its record into place
  (processes and threads that build at once never load a partial file, nor share a temporary).
  A leftover of a dead builder on this host (a folder of exactly that shape, owned by this user,
  whose pid no longer runs) is removed at the next load; nothing else in the cache folder is
  ever deleted but this package's own library and record files. One thread of a process builds
  at a time (:func:`exclusive`).
* A compiler that reports success but leaves no whole library is a failed build: nothing of it
  is recorded or cached.
* Nothing read from the cache can hang or break a step: the library and its record are opened
  without blocking (a FIFO in their place is refused, not waited on) and must be regular files;
  a record that is not ASCII hex is a mismatch; every descriptor is closed.
* A private fallback folder is removed once its library is loaded (the mapping stays valid).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BUILD_TIMEOUT_S", "FLAGS", "KILL_WAIT_S", "SOURCE", "cache_dir", "cxx_compiler", "exclusive",
           "library_path", "load_library"]

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -ffp-contract=off: no product is fused into an FMA, so every result rounds as torch's separate
# ops round it (the step is bit for bit impl="for_loop"'s). -march=native: vectorised for this CPU,
# and -mprefer-vector-width=512 lets the compiler use its widest vectors where it would otherwise
# prefer narrower ones (a CPU without them ignores it). -fno-trapping-math: nothing reads
# floating-point exception flags, and without it selects on float comparisons stay scalar; it
# changes no value (no reassociation, no fast-math).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-trapping-math",
         "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# The build takes seconds; a compiler that hangs must not hang training for long.
BUILD_TIMEOUT_S = 120
# How long a killed compiler may take to exit before the build gives up on it (a process in
# uninterruptible sleep, on a hung network file system, outlives SIGKILL).
KILL_WAIT_S = 10
# A file far larger than any build of the kernel is not one (and is not read whole into memory).
_MAX_LIBRARY_BYTES = 256 << 20

_RECORD_SUFFIX = ".sha256"
_BUILD_PREFIX = ".lion_hf_build"
# The only names the sweep deletes: this package's build folders, and the temporary files earlier
# versions wrote beside the library (.<library>.<host>.<pid>.tmp).
_BUILD_FOLDER = re.compile(r"\.lion_hf_build\.([A-Za-z0-9_-]+)\.(\d+)\.\d+\.[0-9a-f]{16}")
_OLD_TEMPORARY = re.compile(r"\.lion_cpu_kernel_[0-9a-f]{24}\.so(?:\.sha256)?\.([A-Za-z0-9_-]+)\.(\d+)\.tmp")
# Reentrant: cpu_kernel holds it around its first load, which builds under it.
_LOCK = threading.RLock()


def _new_lock_after_fork() -> None:
    # A child forked while another thread built holds a copy of the lock that nobody will release.
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def cxx_compiler() -> str | None:
    """The C++ compiler the build uses: ``$CXX``, else g++, else c++ (None if none is on the PATH)."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cache_dir() -> Path:
    root = os.environ.get("LION_HF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_hf"


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler_identity(cxx: str) -> str:
    """The compiler as a cache key, without running it: its resolved path, size and mtime."""
    real = os.path.realpath(cxx)
    try:
        info = os.stat(real)
    except OSError:
        return real
    return f"{real}:{info.st_size}:{info.st_mtime_ns}"


def library_path(cxx: str, folder: Path | None = None) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_identity(cxx).encode(), " ".join(FLAGS).encode(),
                 _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return (cache_dir() if folder is None else folder) / f"lion_cpu_kernel_{digest.hexdigest()[:24]}.so"


def _untrusted_because(info: os.stat_result, what: str) -> str | None:
    """Why a file or folder with this stat may not be trusted, or None."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{what} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} can be written by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def _trusted_folder(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700) if needed; why it cannot be trusted, or None."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(folder)
    except OSError as exc:
        return f"it cannot be used ({exc})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    return _untrusted_because(info, "it")


def _host_tag() -> str:
    """This host's name as a file-name part: a pid means something only on the host that gave it
    (a cache in a home folder shared over NFS is seen by several hosts)."""
    host = socket.gethostname() or "localhost"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in host)


def _alive(pid: int) -> bool:
    """Whether a process of this host has this pid (when unsure, yes: a leftover is then kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # alive under another user, or not ours to ask about
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the build leftovers of processes of this host that no longer run: only names this
    package writes (a build folder ``.lion_hf_build.<host>.<pid>.<thread>.<random>``, an earlier
    version's ``.lion_cpu_kernel_<hash>.so[.sha256].<host>.<pid>.tmp``), owned by this user. A
    user's file in the cache folder is never touched, whatever its name; another host's leftover
    is left alone (its pids mean nothing here)."""
    host = _host_tag()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _BUILD_FOLDER.fullmatch(name) or _OLD_TEMPORARY.fullmatch(name)
        if match is None or match.group(1) != host:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        leftover = folder / name
        try:
            info = os.lstat(leftover)
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                continue
            if match.re is _BUILD_FOLDER and stat.S_ISDIR(info.st_mode):
                shutil.rmtree(leftover, ignore_errors=True)
            elif match.re is _OLD_TEMPORARY and stat.S_ISREG(info.st_mode):
                leftover.unlink(missing_ok=True)
        except OSError:
            pass


def _death_signal_hook(signum: int) -> object:
    """For the compiler's ``preexec_fn`` (Linux): ``signum`` when the parent dies, so that a
    training process killed mid-build (SIGKILL, the OOM killer) leaves no compiler running.
    ``prctl`` is looked up here, in the parent: between fork and exec (other threads' locks copied
    as they were) the child should do no more than call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signum), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return hook


# The guard process (Linux): a parent's death signal reaches only its own child, the compiler
# driver, not the driver's children (cc1plus, as, ld), which would run on and leave their
# temporaries. The guard receives SIGTERM when the builder dies and kills its whole process group,
# the compiler's processes with it; otherwise it waits for the compiler and exits with its status.
_GUARD = (
    "import os, signal, sys\n"
    "def stop(*_):\n"
    "    os.killpg(0, signal.SIGKILL)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    stop()\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 255)\n"
)


def _guarded(command: list[str]) -> tuple[list[str], object]:
    """The command to run and its ``preexec_fn``: under the guard on Linux, else as it is."""
    if sys.platform.startswith("linux") and sys.executable and hasattr(os, "posix_spawn"):
        hook = _death_signal_hook(signal.SIGTERM)
        if hook is not None:
            return [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), *command], hook
    return command, _death_signal_hook(signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> bool:
    """SIGKILL to the process's group, then a bounded wait; whether it exited in time."""
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the guard, the driver, cc1plus, as and ld
    except OSError:
        pass
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        return False
    return True


def _run_compiler(cxx: str, command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the compiler for at most :data:`BUILD_TIMEOUT_S` seconds; its exit status and its last
    messages. Its output goes to an unnamed temporary file, never a pipe: nothing it leaves
    running can make this wait. Raises RuntimeError on the time limit; an interruption kills the
    compiler's group before it propagates."""
    command, hook = _guarded(command)
    with tempfile.TemporaryFile() as messages:
        compiler = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=messages, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, preexec_fn=hook)
        try:
            compiler.wait(timeout=BUILD_TIMEOUT_S)
        except BaseException as exc:  # the time limit, or KeyboardInterrupt / SystemExit mid-build
            exited = _kill_group(compiler)
            if isinstance(exc, subprocess.TimeoutExpired):
                gone = "" if exited else f"; it did not exit within {KILL_WAIT_S} s of SIGKILL and was abandoned"
                raise RuntimeError(f"{cxx} did not build {SOURCE.name} within {BUILD_TIMEOUT_S} s{gone}") from None
            raise
        size = messages.seek(0, os.SEEK_END)
        messages.seek(max(0, size - 4000))
        return compiler.returncode, messages.read().decode(errors="replace")


def _build(cxx: str, path: Path) -> None:
    """Compile in a build folder of this build alone, check the library, then record its hash and
    rename both into place (the record first: a library is never visible without it). Raises
    RuntimeError. An interrupted build (any BaseException) kills the compiler's process group and
    removes its folder before it propagates."""
    try:
        build = path.parent / (f"{_BUILD_PREFIX}.{_host_tag()}.{os.getpid()}.{threading.get_native_id()}."
                               f"{secrets.token_hex(8)}")
        build.mkdir(mode=0o700)
    except OSError as exc:
        raise RuntimeError(f"could not build {SOURCE.name} into {path.parent}: {exc}") from exc
    output, record = build / path.name, build / (path.name + _RECORD_SUFFIX)
    # The compiler's own temporaries (cc1plus's assembly, as's object) go into the build folder too:
    # a build killed with its process leaves them where the next load's sweep finds them.
    env = {**os.environ, "TMPDIR": str(build)}
    try:
        returncode, errors = _run_compiler(cxx, [cxx, *FLAGS, str(SOURCE), "-o", str(output)], env)
        if returncode != 0:
            raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {errors.strip()[-2000:]}")
        data = _read_whole(output)
        problem = _elf_problem(data)
        if problem is not None:
            raise RuntimeError(f"{cxx} reported success but wrote no whole library ({problem})")
        os.chmod(output, 0o700)
        record.write_text(hashlib.sha256(data).hexdigest())
        os.replace(record, path.with_name(path.name + _RECORD_SUFFIX))
        os.replace(output, path)
    except OSError as exc:
        raise RuntimeError(f"could not build {SOURCE.name} into {path.parent}: {exc}") from exc
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _elf_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole ELF file, or None: its header, every segment the loader maps and
    its section header table must lie inside it. The loader maps a segment that runs past the end
    of a short file without complaint, and the process dies with SIGBUS when it touches it."""
    wide = len(data) > 5 and data[4] == 2
    if len(data) < (64 if wide else 52) or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return f"no ELF header in its {len(data)} bytes"
    order = "<" if data[5] == 1 else ">"
    _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = struct.unpack_from(
        order + ("QQQIHHHHHH" if wide else "IIIIHHHHHH"), data, 24)
    segment = order + ("IIQQQQ" if wide else "IIIIII")
    offset_at, size_at = (2, 5) if wide else (1, 4)
    if phnum == 0 or phentsize < struct.calcsize(segment) or phoff + phnum * phentsize > len(data):
        return f"its program headers are missing or lie past its end (byte {len(data)})"
    for i in range(phnum):
        fields = struct.unpack_from(segment, data, phoff + i * phentsize)
        end = fields[offset_at] + fields[size_at]
        if end > len(data):
            return f"segment {i} ends at byte {end} of a {len(data)}-byte file: it was cut short"
    if shnum and shoff + shnum * shentsize > len(data):
        return f"its section headers end past byte {len(data)}: it was cut short"
    return None


def _read_whole(path: Path) -> bytes:
    """The file at ``path``, refused (OSError) when it is larger than any build of the kernel."""
    fd = _open_regular(path)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    chunks, size = [], 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_LIBRARY_BYTES:
            raise OSError(f"more than {_MAX_LIBRARY_BYTES} bytes: no build of the kernel is that large")
    return b"".join(chunks)


# Never wait on a FIFO or device put where a file is expected; never follow a symlink.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _open_regular(path: Path) -> int:
    """A descriptor of the regular file at ``path``, opened without blocking; raises OSError when
    it is absent, cannot be opened or is not a regular file (the descriptor is then closed)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _recorded_digest(path: Path) -> str | None:
    """The hex SHA-256 recorded beside the library, or None when it is missing, not a regular
    file, unreadable or not ASCII (a damaged record is a mismatch, never an exception)."""
    try:
        fd = _open_regular(path.with_name(path.name + _RECORD_SUFFIX))
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # 64 hex digits; anything longer is no record of ours
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


def _checked_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """The library at ``path`` once it passed every check, read whole through one descriptor (the
    bytes checked are the bytes loaded), or the reason it did not."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None, "it does not exist"
    except OSError as exc:
        return None, f"it cannot be opened ({exc})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "it is not a regular file"
        reason = _untrusted_because(info, "it")
        if reason is not None:
            return None, reason
        recorded = _recorded_digest(path)
        if recorded is None:
            return None, "its checksum record is missing or unreadable"
        data = _read_fd(fd)
        if hashlib.sha256(data).hexdigest() != recorded:
            return None, "its SHA-256 does not match the one recorded when it was built (truncated or changed)"
        problem = _elf_problem(data)
        if problem is not None:
            return None, f"it is not a whole library although its checksum record matches it ({problem})"
        return data, None
    except OSError as exc:
        return None, f"it cannot be read ({exc})"
    finally:
        os.close(fd)


def _load_bytes(data: bytes) -> ctypes.CDLL:
    """Load the checked bytes from a copy of this process's own: a sealed memfd on Linux (nobody can
    write, cut or grow it), else (or where the kernel refuses executable memfds) a private
    temporary file removed once loaded. What another process does to the cached file later cannot
    reach the mapped library."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        try:
            return _load_from_memfd(data)
        except OSError:
            pass  # vm.memfd_noexec, or the library itself: the private file says which
    fd, name = tempfile.mkstemp(prefix="lion_hf_kernel_", suffix=".so")  # mode 0600, this user's
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _load_from_memfd(data: bytes) -> ctypes.CDLL:
    fd = os.memfd_create("lion_hf_cpu_kernel", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        with contextlib.suppress(OSError, AttributeError):  # the copy is private already; seals only add
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        return ctypes.CDLL(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _load_checked(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    data, reason = _checked_bytes(path)
    if data is None:
        return None, reason
    try:
        return _load_bytes(data), None
    except OSError as exc:
        return None, f"it failed to load ({exc})"


def _lock_wait_s() -> float:
    # Another thread holds the lock for one build at most (its limit, the kill's) and one load.
    return BUILD_TIMEOUT_S + KILL_WAIT_S + 60


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Held by one thread of the process at a time, around a load and a build: threads that take
    their first cpp step at once build once, and the others then load what it built. Raises
    RuntimeError when another thread held it past any build's time limit."""
    if not _LOCK.acquire(timeout=_lock_wait_s()):
        raise RuntimeError(f"another thread of this process has been building the kernel for over {_lock_wait_s()} s")
    try:
        yield
    finally:
        _LOCK.release()


def _private_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="lion_hf_kernel_"))


def load_library() -> ctypes.CDLL:
    """The kernel's library: from the cache when it passes the checks, else built (once more at
    most). Raises RuntimeError saying why when it can be neither loaded nor built."""
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("impl='cpp' needs a C++ compiler (g++) on the PATH, or $CXX")
    folder = cache_dir()
    reason = _trusted_folder(folder)
    private = None
    if reason is not None:
        private = folder = _private_folder()
        warnings.warn(f"Lion: the kernel cache {cache_dir()} is not used: {reason}. Building into the private folder "
                      f"{private} instead (set LION_HF_CACHE to a folder only you can write to).", stacklevel=5)
    try:
        with exclusive():
            return _load_or_build(cxx, library_path(cxx, folder))
    finally:
        if private is not None:
            # Built for this process alone: a loaded library stays mapped after its file is gone,
            # and a folder per process would otherwise pile up in /tmp.
            shutil.rmtree(private, ignore_errors=True)


def _load_or_build(cxx: str, path: Path) -> ctypes.CDLL:
    _remove_stale_temporaries(path.parent)
    library, why = _load_checked(path)
    if library is not None:
        return library
    if why != "it does not exist":
        warnings.warn(f"Lion: the cached kernel {path} is not loaded: {why}. Rebuilding it.", stacklevel=6)
        for stale in (path, path.with_name(path.name + _RECORD_SUFFIX)):
            try:
                stale.unlink(missing_ok=True)
            except OSError:
                pass  # a folder in its place: the build's rename then fails with a reason
    _build(cxx, path)
    library, why = _load_checked(path)
    if library is None:
        raise RuntimeError(f"the kernel built at {path} is not loaded: {why}")
    return library
