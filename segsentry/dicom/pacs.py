"""A local PACS for the tests and benchmarks: Orthanc in a private network namespace, where only ``lo`` exists.

Orthanc 1.10 has no bind-address option and listens on 0.0.0.0; inside ``unshare --net`` that is loopback
only, and no port can clash with anything else on the machine. :class:`NetNamespace` holds the namespace
(a sleeping child), starts processes in it (``nsenter --net``: Orthanc, ``ood-serve``) and runs the test's
own network calls (pynetdicom SCU, REST) in a thread that joined it (``setns`` is per thread). Everything
talks to 127.0.0.1. Needs root (CI runs as root) and util-linux's unshare/nsenter; tests skip otherwise.
A development tool (like ``segsentry.devtools``): nothing in ``ood-serve`` uses it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import signal
import time
import urllib.request
from pathlib import Path

CLONE_NEWNET = 0x40000000
ORTHANC_HTTP, ORTHANC_DICOM, NODE_PORT = 8042, 4242, 11112

# bring lo up with two ioctls (no iproute2 needed): SIOCGIFFLAGS, SIOCSIFFLAGS |= IFF_UP
_LO_UP = """
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))
print("ready", flush=True)
sys.stdin.read()
"""


def namespace_problem() -> str | None:
    """Why a private network namespace cannot be made here, or None."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    run = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if run.returncode != 0:
        return f"unshare --net fails here (needs root): {run.stderr.strip()[:120]}"
    return None


class NetNamespace:
    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", sys.executable, "-c", _LO_UP], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            raise RuntimeError("the network namespace holder did not start")
        self.path = f"/proc/{self.holder.pid}/ns/net"

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace (nsenter execs it: the pid is the program's)."""
        return subprocess.Popen(["nsenter", f"--net={self.path}", *argv], **kwargs)

    def call(self, fn, *args, **kwargs):
        """Run ``fn`` in a thread that joined the namespace; return its result or raise its exception."""
        box: dict = {}

        def body() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    box["error"] = OSError(ctypes.get_errno(), "setns failed")
                    return
            finally:
                os.close(fd)
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        self.holder.stdin.close()
        self.holder.wait(timeout=10)


class Orthanc:
    """Orthanc with a temporary config and storage, inside ``ns``; :meth:`stop` ends it."""

    def __init__(self, ns: NetNamespace, root: Path) -> None:
        self.ns = ns
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "segsentry-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
            "HttpPort": ORTHANC_HTTP, "DicomPort": ORTHANC_DICOM, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {"segsentry": ["SEGSENTRY", "127.0.0.1", NODE_PORT]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True, "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = open(root / "orthanc.log", "w")
        self.process = ns.popen(["Orthanc", str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start; see {root / 'orthanc.log'}") from None
                time.sleep(0.2)

    def get(self, path: str, *, raw: bool = False):
        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{ORTHANC_HTTP}{path}", timeout=10) as response:
                return response.read()

        data = self.ns.call(fetch)
        return data if raw else json.loads(data)

    def delete_all(self) -> None:
        def remove():
            for patient in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ORTHANC_HTTP}/patients").read()):
                request = urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}/patients/{patient}", method="DELETE")
                urllib.request.urlopen(request, timeout=10).read()

        self.ns.call(remove)

    def results(self, study_uid: str) -> dict[str, list[bytes]]:
        """{"SEG": [file bytes...], "SR": [...]} of the study's SEG and SR instances."""
        found: dict[str, list[bytes]] = {"SEG": [], "SR": []}
        for series in self.get("/series?expand"):
            tags = series["MainDicomTags"]
            modality = tags.get("Modality")
            if modality not in found:
                continue
            study = self.get(f"/studies/{series['ParentStudy']}")
            if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
                continue
            for instance in series["Instances"]:
                found[modality].append(self.get(f"/instances/{instance}/file", raw=True))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def send_series(files: list[Path], *, port: int = NODE_PORT, ae_title: str = "SEGSENTRY", abort_after: int | None = None,
                datasets=None) -> list[int]:
    """C-STORE ``files`` (or ``datasets``) to ``ae_title@127.0.0.1:port`` in one association; the statuses.
    ``abort_after``: drop the association (A-ABORT) after that many instances. Call inside the namespace."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    items = datasets if datasets is not None else [pydicom.dcmread(str(f)) for f in files]
    ae = AE(ae_title="TESTSCU")
    for sop in (CTImageStorage, MRImageStorage, Verification):
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {ae_title}@127.0.0.1:{port}")
    statuses = []
    for i, ds in enumerate(items):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return statuses
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if "Status" in status else -1)
    assoc.release()
    return statuses


def echo(*, port: int = NODE_PORT, ae_title: str = "SEGSENTRY") -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return -1
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else -1


class ServeProcess:
    """``python -m segsentry.cli serve`` in the PACS's namespace, forwarding to it; whoever starts it stops it."""

    def __init__(self, pacs: Orthanc, bundle: Path, work: Path, *, series_timeout: float = 1.0) -> None:
        self.pacs, self.work = pacs, work
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work.parent / f"{work.name}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "segsentry.cli", "serve", str(bundle), "--port", str(NODE_PORT), "--work",
                str(work), "--forward", f"ORTHANC@127.0.0.1:{ORTHANC_DICOM}", "--series-timeout",
                str(series_timeout), "--retries", "3"]
        self.process = pacs.ns.popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while pacs.ns.call(echo) != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"ood-serve did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def send(self, files, **kwargs) -> list[int]:
        return self.pacs.ns.call(send_series, files, **kwargs)

    def state(self, series: str) -> str | None:
        path = self.work / ".queue" / f"{series}.json"
        return json.loads(path.read_text())["state"] if path.is_file() else None

    def wait_answered(self, series: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while any(self.state(s) not in ("done", "failed") for s in series):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"not answered: {[(s, self.state(s)) for s in series]}\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        if any(self.state(s) != "done" for s in series):
            raise RuntimeError(f"failed: {[(s, self.state(s)) for s in series]}\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.log.close()
        return code
