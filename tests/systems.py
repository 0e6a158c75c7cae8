"""NVFlare systems that tests start (POC, provisioned kits, the simulator): their processes, found and
stopped by process id, never by name.

NVFlare daemonises its services (``start.sh`` leaves a watchdog parented to init) and starts every job
process in a new session, so neither the process tree nor one process group holds them all. Every
process inherits its parent's environment, though: a test starts a system with a unique token in the
environment and later finds exactly the processes that descend from what it started by that token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

TOKEN_VAR = "FEDBPT_TEST_SYSTEM"


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environ_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class System:
    """The processes one test starts, marked by a token in their environment, and the folders they write.

    ``env`` is what to start them with: a throwaway HOME (NVFlare writes ~/.nvflare/config.conf there)
    and the token. ``stop`` ends every marked process by its id; ``close`` also removes the folders."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.token = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if k != "NVFLARE_HOME"}
        self.env.update(HOME=str(self.home), PYTHONDONTWRITEBYTECODE="1", **{TOKEN_VAR: self.token})
        self.log: list[str] = []

    def pids(self) -> list[int]:
        """Every live process that carries this system's token."""
        mark = f"{TOKEN_VAR}={self.token}".encode()
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and mark in environ_of(int(p)).split(b"\0"))

    def run(self, *args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None) -> str:
        """An NVFlare CLI command (``nvflare --format json ...``); returns its stdout."""
        proc = subprocess.run(["nvflare", "--format", "json", *args], env=self.env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        self.log.append(f"$ nvflare {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if check:
            assert proc.returncode == 0, self.log[-1]
        return proc.stdout

    def data(self, *args: str, timeout: float = 120) -> dict:
        """The ``data`` of an NVFlare CLI command's JSON answer."""
        return json.loads(self.run(*args, timeout=timeout))["data"]

    def start(self, command: list[str], log: Path) -> None:
        """Start a service script (``startup/start.sh``) in its own session, output to ``log``."""
        with open(log, "ab") as out:
            subprocess.run(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=60,
                           start_new_session=True, check=True)  # fmt: skip

    def wait_gone(self, pids: list[int], timeout: float) -> list[int]:
        """Wait until ``pids`` have exited; returns those still alive after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def kill_all(self, timeout: float = 30) -> list[int]:
        """SIGKILL every marked process, by id, until none is left (a watchdog may start one more), and
        wait until they are reaped: NVFlare reads a pid file's process, a zombie too, as a running
        service. Returns the ids it killed."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            self.wait_gone(pids, 5)
        while any(os.path.exists(f"/proc/{pid}") for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.2)  # killed but not yet reaped by their parent (init, for daemonised ones)
        return killed

    def close(self, *folders: Path) -> None:
        """Kill what is left, then remove the folders the system wrote (and the throwaway HOME)."""
        self.kill_all()
        for folder in (*folders, self.home):
            shutil.rmtree(folder, ignore_errors=True)


def poc_bind_loopback(prod_dir: Path, port: int) -> None:
    """After ``nvflare poc prepare``: the server listens on 127.0.0.1:``port`` only (a loopback target
    makes NVFlare bind loopback), and the sites and admins connect to that port."""

    def edit(path: Path, change) -> None:
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config, indent=2))

    def server(config: dict) -> None:
        config["servers"][0]["service"]["target"] = f"127.0.0.1:{port}"
        config["servers"][0]["admin_port"] = port

    edit(prod_dir / "server" / "startup" / "fed_server.json", server)
    for path in prod_dir.glob("*/startup/fed_client.json"):
        edit(path, lambda c: c["servers"][0]["service"].update(target=f"localhost:{port}"))
    for path in prod_dir.glob("*/startup/fed_admin.json"):
        edit(path, lambda c: c["admin"].update(port=port))


def listening_addresses(pids: list[int]) -> set[str]:
    """The TCP addresses (host:port) on which ``pids`` listen, from /proc/net/tcp and tcp6."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            out.add(f"{_host(host_hex, width)}:{int(port_hex, 16)}")
    return out


def _host(hex_addr: str, width: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)
