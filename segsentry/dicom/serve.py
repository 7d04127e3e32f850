"""``ood-serve``: a DICOM node at the scanner. C-STORE SCP in, ``ood-run`` per series, SEG + SR out by C-STORE.

Flow (one process, three threads besides pynetdicom's):

- **receive** (pynetdicom's association threads): accept CT and MR Image Storage and C-ECHO; write each
  instance to ``WORK/.incoming/<series>/<sop>.dcm`` (atomically) and note its arrival time;
- **schedule**: a series is complete when no instance of it has arrived for ``series_timeout`` seconds; it is
  then queued;
- **work** (exactly one worker): run the series through the bundle (``run_batch``: the usual outputs under
  ``WORK/<study>/<series>/``, plus SEG, SR and a drift-watch line), then C-STORE the SEG and SR to the
  forward node, retrying with exponential backoff.

State is on disk, one JSON file per series in ``WORK/.queue/`` written atomically at every step
(``receiving`` → ``queued`` → ``processed`` → ``done``, or ``failed``), so SIGTERM (clean stop: the worker
finishes its series, the queue stays) or ``kill -9`` loses nothing: a restart re-queues what was received and
not answered, re-runs a series interrupted mid-run and only forwards one whose results were written. A series
answered twice because the process died between sending and recording it carries the same SOP Instance UIDs
(:mod:`segsentry.dicom.uids`), so the PACS replaces rather than duplicates it; the drift-watch reader keeps one
line per series. Instances arriving after their series was answered are logged and dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.dicom import require
from segsentry.dicom.monitor import MonitorLog
from segsentry.dicom.outputs import DicomResultWriter
from segsentry.dicom.series import STORAGE_CLASSES
from segsentry.errors import InputError, SegsentryError

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH = 0x0000, 0xA700, 0xC210, 0xA900
RECEIVING, QUEUED, PROCESSED, DONE, FAILED = "receiving", "queued", "processed", "done", "failed"


class ServeError(SegsentryError):
    """ood-serve cannot start or cannot forward (bad --forward, port in use, peer refuses)."""


@dataclass(frozen=True)
class ForwardTarget:
    """Where results go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ForwardTarget:
        match = _TARGET.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise InputError(f"--forward expects AE@HOST:PORT (AE title up to 16 characters), got {text!r}")
        return cls(match["ae"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ServeOptions:
    bundle: Path
    work: Path
    port: int
    forward: ForwardTarget | None
    host: str = "127.0.0.1"
    ae_title: str = "SEGSENTRY"
    series_timeout: float = 10.0  # seconds without a new instance before a series counts as complete
    retries: int = 5  # forwarding attempts after the first
    backoff_s: float = 1.0  # first retry delay, doubled each time
    backend: str = "auto"
    threads: int | None = None
    qa: bool = False
    monitor_log: Path | None = None  # default WORK/monitor.jsonl


@dataclass
class SeriesState:
    """One series' entry in the on-disk queue (``WORK/.queue/<series>.json``)."""

    series: str
    study: str
    state: str
    updated: float = field(default_factory=time.time)
    instances: int = 0
    error: str | None = None
    results: list[str] = field(default_factory=list)  # SEG and SR files, once written


class SeriesQueue:
    """The persistent per-series state, guarded by one lock (receive, schedule and work threads share it)."""

    def __init__(self, work: Path) -> None:
        self.folder = work / ".queue"
        self.incoming = work / ".incoming"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.states: dict[str, SeriesState] = {}
        self.last_arrival: dict[str, float] = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                state = SeriesState(**json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, TypeError, OSError) as exc:
                log.error("queue entry %s is unreadable (%s); left alone", path.name, exc)
                continue
            self.states[state.series] = state
            if state.state == RECEIVING:
                files = list((self.incoming / state.series).glob("*.dcm"))
                self.last_arrival[state.series] = max((f.stat().st_mtime for f in files), default=state.updated)

    def save(self, state: SeriesState) -> None:
        state.updated = time.time()
        write_text_atomic(self.folder / f"{state.series}.json", json.dumps(asdict(state), indent=1))

    def resumable(self) -> list[SeriesState]:
        """Series a restart must finish (queued or processed, not answered), oldest first."""
        return sorted((s for s in self.states.values() if s.state in (QUEUED, PROCESSED)), key=lambda s: s.updated)


class DicomNode:
    """The ``ood-serve`` process: :meth:`start`, then :meth:`stop` (from a signal handler: :meth:`request_stop`)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        pynetdicom = require("pynetdicom", "ood-serve")
        self._pynetdicom = pynetdicom
        options.work.mkdir(parents=True, exist_ok=True)
        self.queue = SeriesQueue(options.work)
        self.jobs: queue.Queue[str] = queue.Queue()
        self.stopping = threading.Event()
        self.writer = DicomResultWriter(options.bundle)
        self.monitor_path = options.monitor_log or options.work / "monitor.jsonl"
        self.server = None
        self.threads: list[threading.Thread] = []
        self.answered: list[str] = []  # series answered by this process, in order (for tests and logs)
        self.running: set[str] = set()  # the worker's series (at most one): later instances of it are dropped

    # -- receive ---------------------------------------------------------------------------------------------
    def _application_entity(self):
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.options.ae_title)
        ae.require_called_aet = True  # a caller must address this node by its AE title
        for sop_class in STORAGE_CLASSES.values():
            ae.add_supported_context(sop_class)
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        return ae

    def handle_store(self, event) -> int:
        """Store one instance; a status for the SCU. Never raises: a bad dataset fails only itself."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop, series, study = (str(ds.get(k, "")) for k in ("SOPInstanceUID", "SeriesInstanceUID",
                                                               "StudyInstanceUID"))
            if str(ds.get("SOPClassUID", "")) not in STORAGE_CLASSES.values():
                log.warning("refused an instance of SOP class %s (CT and MR Image Storage only)",
                            ds.get("SOPClassUID", "?"))
                return DATA_SET_DOES_NOT_MATCH
            if not all(_UID.match(u) and len(u) <= 64 for u in (sop, series, study)):
                log.warning("refused an instance without valid SOP/Series/Study Instance UIDs (%r, %r, %r)",
                            sop[:70], series[:70], study[:70])
                return DATA_SET_DOES_NOT_MATCH
        except Exception as exc:  # noqa: BLE001 - any undecodable dataset from the network fails only itself
            log.warning("refused a dataset that cannot be decoded: %s: %s", type(exc).__name__, exc)
            return CANNOT_UNDERSTAND
        with self.queue.lock:
            state = self.queue.states.get(series)
            if state is not None and (state.state not in (RECEIVING, QUEUED) or series in self.running):
                log.warning("instance %s arrived after series %s was taken (%s); dropped", sop, series, state.state)
                return SUCCESS
        target = self.queue.incoming / series / f"{sop}.dcm"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                ds.save_as(str(tmp), enforce_file_format=True)
        except OSError as exc:
            log.error("cannot store instance %s: %s", sop, exc)
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot re-encode is malformed
            log.warning("refused instance %s: cannot be written (%s: %s)", sop, type(exc).__name__, exc)
            return CANNOT_UNDERSTAND
        with self.queue.lock:
            state = self.queue.states.get(series)
            if (state is None or state.state == QUEUED) and series not in self.running:  # new, or not started
                state = state or SeriesState(series=series, study=study, state=RECEIVING)
                state.state = RECEIVING
                self.queue.states[series] = state
                self.queue.save(state)
            self.queue.last_arrival[series] = time.time()
        return SUCCESS

    # -- schedule --------------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        with self.queue.lock:
            for state in self.queue.resumable():
                self.jobs.put(state.series)
        while not self.stopping.wait(0.1):
            now = time.time()  # wall clock: arrival times restored from disk are file modification times
            with self.queue.lock:
                for series, last in list(self.queue.last_arrival.items()):
                    state = self.queue.states[series]
                    if state.state == RECEIVING and now - last >= self.options.series_timeout:
                        state.state = QUEUED
                        state.instances = len(list((self.queue.incoming / series).glob("*.dcm")))
                        self.queue.save(state)
                        del self.queue.last_arrival[series]
                        self.jobs.put(series)

    # -- work ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                series = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            with self.queue.lock:  # a job is stale when more instances came (back to receiving) or it is done
                if self.queue.states[series].state not in (QUEUED, PROCESSED):
                    continue
                self.running.add(series)
            try:
                self._answer(series)
            except Exception:  # noqa: BLE001 - a bug on one series must not stop the node; it stays queued
                log.exception("series %s: unexpected error; it stays in the queue for the next start", series)
            finally:
                with self.queue.lock:
                    self.running.discard(series)

    def _answer(self, series: str) -> None:
        start = time.perf_counter()
        with self.queue.lock:
            state = self.queue.states[series]
        if state.state == QUEUED or (state.state == PROCESSED and not all(Path(r).is_file() for r in state.results)):
            from segsentry.runtime.batch import run_batch

            out = self.options.work / state.study / series
            try:
                result = run_batch(self.options.bundle, [self.queue.incoming / series], out,
                                   backend=self.options.backend, threads=self.options.threads, qa=self.options.qa,
                                   case_hooks=[self.writer, MonitorLog(self.monitor_path, source="ood-serve",
                                                                       key=series)])
            except SegsentryError as exc:
                self._finish(state, FAILED, error=str(exc), start=start)
                return
            outcome = result.outcomes[0]
            if outcome.status != "ok" or outcome.report is None:
                self._finish(state, FAILED, error=outcome.error, start=start)
                return
            report = outcome.report
            state.results = [report.outputs["dicom_seg"], report.outputs["dicom_sr"]]
            state.state = PROCESSED
            with self.queue.lock:
                self.queue.save(state)
            verdict = "not scored" if report.ood is None else ("OOD" if report.ood else "in distribution")
            u = "-" if report.uncertainty is None else f"{report.uncertainty:.3f}"
            log.info("series %s: %d instance(s), U %s, %s, %.1f s", series, state.instances, u, verdict,
                     time.perf_counter() - start)
        if self.options.forward is not None:
            try:
                forward([Path(r) for r in state.results], self.options.forward, calling_ae=self.options.ae_title,
                        retries=self.options.retries, backoff_s=self.options.backoff_s, stop=self.stopping)
            except ServeError as exc:
                log.error("series %s: results not forwarded (%s); they are sent again at the next start", series, exc)
                return
        self._finish(state, DONE, start=start)

    def _finish(self, state: SeriesState, final: str, *, start: float, error: str | None = None) -> None:
        state.state, state.error = final, error
        with self.queue.lock:
            self.queue.save(state)
        shutil.rmtree(self.queue.incoming / state.series, ignore_errors=True)
        self.answered.append(state.series)
        where = f"sent to {self.options.forward}" if self.options.forward else "not forwarded (no --forward)"
        if final == DONE:
            log.info("series %s answered: SEG + SR %s (%.1f s)", state.series, where, time.perf_counter() - start)
        else:
            log.error("series %s failed: %s", state.series, error)

    # -- lifetime --------------------------------------------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import evt

        ae = self._application_entity()
        try:
            self.server = ae.start_server((self.options.host, self.options.port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        except OSError as exc:
            raise ServeError(f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror or exc}") from exc
        for name, target in (("schedule", self._schedule), ("work", self._work)):
            thread = threading.Thread(target=target, name=f"ood-serve-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("ood-serve %s listening on %s:%d, series timeout %g s, results to %s", self.options.ae_title,
                 self.options.host, self.options.port, self.options.series_timeout, self.options.forward or "nowhere")

    def request_stop(self, *_args) -> None:
        self.stopping.set()

    def stop(self) -> None:
        """Stop listening, let the worker finish its series; everything not answered stays queued on disk."""
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join()
        log.info("ood-serve stopped; %d series answered by this run", len(self.answered))

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass


def forward(files: Sequence[Path], target: ForwardTarget, *, calling_ae: str, retries: int = 5,
            backoff_s: float = 1.0, stop: threading.Event | None = None) -> None:
    """C-STORE ``files`` to ``target`` in one association, retrying the whole send with exponential backoff
    (``backoff_s``, then twice that, ...); raise :class:`ServeError` after ``retries`` retries."""
    for attempt in range(retries + 1):
        try:
            _send_once(files, target, calling_ae)
            return
        except ServeError as exc:
            if attempt == retries:
                raise
            delay = backoff_s * 2 ** attempt
            log.warning("forward to %s failed (%s); retry %d/%d in %.1f s", target, exc, attempt + 1, retries, delay)
            if stop is not None and stop.wait(delay):
                raise ServeError(f"stopped while retrying: {exc}") from None
            if stop is None:
                time.sleep(delay)


def _send_once(files: Sequence[Path], target: ForwardTarget, calling_ae: str) -> None:
    pydicom = require("pydicom", "ood-serve")
    from pynetdicom import AE

    datasets = [pydicom.dcmread(str(f)) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise ServeError(f"association with {target} not established (refused, aborted or no answer)")
    try:
        for f, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise ServeError(f"no C-STORE answer for {f.name} (connection lost or timed out)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise ServeError(f"{target} answered C-STORE of {f.name} with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
