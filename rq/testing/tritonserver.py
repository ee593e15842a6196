"""A local Triton Inference Server for the live tests and ``benchmarks/bench_tritonserver.py``.

The repository writer ships in :mod:`rq.engines.tritonserver` and the client a user calls in
:mod:`rq.engines.tritonserver_client`; this module is the test tooling around them: find a ``tritonserver`` (the
one the ``nvidia-pytriton`` wheel ships runs on CPU), start it on free local ports in its own process group,
and stop that whole group again (the Python-backend stubs included):
:class:`TritonServer`, :func:`find_tritonserver`, :func:`servable_models`, and :data:`SMOKE_PROMPTS`.

Processes are looked up with ``psutil``, which comes with the ``tritonserver`` and ``dev`` extras.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence


from rq.engines.tritonserver import validate_model_config
from rq.errors import RQError

if TYPE_CHECKING:
    import psutil

SMOKE_PROMPTS = [  # short mixed code/prose prompts for live checks and the load benchmark
    "def forward(self, hidden_states):",
    "The quick brown fox",
    "Mixture of experts models route tokens",
    "import torch\nfor i in range(10):",
    "print(i * 2)",
    "return self.experts(x)",
    "The lazy dog jumps over",
    "tokens to experts.",
]

_SHM_PREFIX = "triton_python_backend_shm_region_"
_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
                      "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow"}


# --------------------------------------------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary with its backends folder (and, for the pytriton wheel, its libs and stubs)."""

    binary: Path
    backends: Path
    libs: Path | None = None
    stubs: Path | None = None  # python_backend_stubs/<major.minor>/triton_python_backend_stub

    @property
    def backend_names(self) -> list[str]:
        return sorted(p.name for p in self.backends.iterdir() if p.is_dir()) if self.backends.is_dir() else []


def find_tritonserver() -> TritonInstall | None:
    """The ``tritonserver`` of the ``nvidia-pytriton`` wheel, else ``$RQ_TRITONSERVER`` / ``tritonserver`` on
    PATH with ``<prefix>/backends`` (the layout of NVIDIA's containers); None when there is none."""
    try:
        import pytriton
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            libs = root.parent.parent / "nvidia_pytriton.libs"
            return TritonInstall(binary, root / "backends", libs if libs.is_dir() else None,
                                 root / "python_backend_stubs")
    except ImportError:
        pass
    found = os.environ.get("RQ_TRITONSERVER") or shutil.which("tritonserver")
    if found:
        binary = Path(found).resolve()
        return TritonInstall(binary, binary.parent.parent / "backends")
    return None


def model_backends(repo_dir: str | Path) -> dict[str, str]:
    """``{model: backend}`` of every model folder in ``repo_dir``, from its ``config.pbtxt`` parsed as Triton's
    ``ModelConfig`` (``backend``, else the backend its ``platform`` implies)."""
    out = {}
    for path in sorted(Path(repo_dir).glob("*/config.pbtxt")):
        config = validate_model_config(path)
        out[path.parent.name] = config.backend or _PLATFORM_BACKENDS.get(config.platform, config.platform)
    return out


def servable_models(repo_dir: str | Path, install: TritonInstall) -> tuple[list[str], dict[str, str]]:
    """Models of ``repo_dir`` whose backend ``install`` has, and ``{model: missing backend}`` for the others."""
    have = set(install.backend_names)
    backends = model_backends(repo_dir)
    return ([m for m, b in backends.items() if b in have], {m: b for m, b in backends.items() if b not in have})


# --------------------------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------------------------
def group_members(pgid: int) -> list["psutil.Process"]:
    """The live processes of process group ``pgid``: a server and its backend stubs. Zombies are left out: they
    have exited and only wait for their parent (or init) to reap them. (psutil has no process-group query, so
    the group id comes from ``os.getpgid``.)"""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue  # exited while we looked
    return members


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """True once no live member of ``pgid`` is left, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(process: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM to the process group led by ``process``, up to ``timeout`` s for it to exit, then SIGKILL to the
    group, and wait until :func:`group_members` finds no live member.

    The group is signalled with ``os.killpg`` (one atomic call reaches members forked a moment ago); ``process``
    itself is reaped with ``Popen.wait`` so its exit code is kept. Returns that exit code.
    """
    pgid = process.pid
    if process.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # stubs may outlive a killed server: clear the whole group
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(10)
    _wait_group_gone(pgid, 10)
    return process.returncode


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------------------------
class TritonServer:
    """A ``tritonserver`` process on 127.0.0.1 with free ports, in its own process group.

    ``models``: load only these (``--model-control-mode=explicit``), e.g. to leave out models whose backend
    the server lacks; None loads the whole repository. Use as a context manager or call :meth:`start` /
    :meth:`stop`; :meth:`stop` signals the whole process group (server and Python-backend stubs) and escalates
    to SIGKILL after ``stop_timeout`` seconds.
    """

    def __init__(self, repo_dir: str | Path, *, models: Iterable[str] | None = None,
                 install: TritonInstall | None = None, log_path: str | Path | None = None,
                 extra_args: Sequence[str] = (), stop_timeout: float = 20.0):
        self.repo_dir = Path(repo_dir).resolve()
        self.models = list(models) if models is not None else None
        self.install = install or find_tritonserver()
        if self.install is None:
            raise RQError("tritonserver is not installed: `pip install nvidia-pytriton` (ships a CPU-capable "
                          "server) or use NVIDIA's Triton container (docs/tritonserver.md)")
        self.extra_args = list(extra_args)
        self.stop_timeout = stop_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="rq-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _backends(self) -> Path:
        """The backends folder, with the Python-backend stub of this interpreter where the wheel needs it."""
        install = self.install
        if install.stubs is None:
            return install.backends
        stub = install.stubs / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        target = self._workdir / "backends"
        shutil.copytree(install.backends, target, ignore=shutil.ignore_patterns("__pycache__"))
        if stub.is_file() and (target / "python").is_dir():
            shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
        return target

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the Python backend runs the `python3` found first on PATH: this interpreter's environment
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(p) for p in (self.install.libs, sysconfig.get_config_var("LIBDIR")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        backends = self._backends()
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        args = [str(self.install.binary), f"--model-repository={self.repo_dir}", f"--backend-directory={backends}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0"]
        if self.models is not None:
            args += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models]]
        args += self.extra_args
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
                                        start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RQError(f"tritonserver exited with code {self.process.returncode} while starting; "
                              f"log: {self.log_path}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        raise RQError(f"tritonserver was not ready after {timeout:.0f} s; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_members(self) -> list[int]:
        """Pids of the live (non-zombie) processes of the server's process group: the server and its stubs."""
        return [p.pid for p in group_members(self.process.pid)] if self.process is not None else []

    def stop(self) -> int | None:
        """Stop the server's process group (SIGTERM, then SIGKILL); returns its exit code."""
        if self.process is None:
            return None
        shm = self._shm_regions()
        try:
            stop_group(self.process, self.stop_timeout)
        finally:
            self._log.close()
            for name in shm:  # a killed stub leaves its shared-memory region behind
                Path("/dev/shm", name).unlink(missing_ok=True)
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            if self.process.returncode == 0 and self.log_path.parent == self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)  # a clean run keeps no log behind
        return self.process.returncode

    def _shm_regions(self) -> set[str]:
        """Names of the Python-backend shared-memory regions of this server's stubs (from their command lines)."""
        import psutil

        names = set()
        for proc in group_members(self.process.pid):
            try:
                names.update(a for a in proc.cmdline() if a.startswith(_SHM_PREFIX))
            except psutil.Error:
                continue
        return names

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
