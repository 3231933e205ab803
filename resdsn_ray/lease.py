"""One writer per output: a run holds the lease `OUTPUT/runs/.lease.json` while it writes there.

Two runs writing one output would interleave their masks and rows, and each would take the
other's half-written cases for done or stale. `acquire` creates the lease exclusively (S3: a
conditional PUT `If-None-Match: *`; locally a hard link, exclusive like `O_CREAT | O_EXCL` but
never seen half-written); a daemon thread renews it every `heartbeat_s`; `release` deletes it
if it is still ours. A lease not renewed for `stale_heartbeats` x `heartbeat_s` belongs to a run
that died, and exactly one of several runs racing for it takes it over:

- S3: a conditional PUT `If-Match: <etag of the stale lease>`. Every renewal is a PUT `If-Match`
  of the previous etag with a new renewal count (so the etag changes), so a taker that judged
  the lease stale cannot overwrite a renewal it did not see, and a holder whose lease was taken
  learns it at its next renewal. After a successful create the lease is read back, against
  stores that do not apply conditional writes atomically.
- Locally there is no compare-and-swap, so a change of the lease file by anyone but its creating
  `O_EXCL` needs a claim on that lease's generation: a file `.lease.json.<token>.claimK` created
  with `O_EXCL`, which only one process can win. The winner checks again that the lease is the
  same file and still stale, renames its own complete lease over it (atomic) and drops the
  claims. A claim left by a process that died in the middle (older than the stale age) makes the
  next level K+1 claimable. Renewal only touches the holder's own inode (`futimens` on its open
  descriptor), so it can never touch a successor's lease; the holder is lost when the path no
  longer names its inode.

Ages are read on the store's clock (S3: the answer's Date minus the object's LastModified;
locally: the file's mtime), never by comparing two hosts' clocks. The one unavoidable window of
every lease without fencing: a holder frozen for longer than the stale age (SIGSTOP, a VM pause)
may write until its next renewal or `Lease.check` notices; `check` renews first when a renewal is
overdue, so call it before each write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from resdsn_ray import storage
from resdsn_ray.config import ArchiveJob
from resdsn_ray.errors import InputError
from resdsn_ray.provenance import utc_iso

LEASE_FILE = ".lease.json"
HEARTBEAT_S = ArchiveJob.lease_heartbeat_s  # the archive job's setting (its default)
STALE_HEARTBEATS = 4
ACQUIRE_ROUNDS = 4
"""Attempts to create or take over the lease while it changes hands under us; then a clear error."""
CLAIM_LEVELS = 3
"""Local takeover claims per lease generation (each one more process that died mid-takeover)."""
_REASON_CHARS = 300
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def lease_uri(output: str) -> str:
    return storage.join(output, "runs", LEASE_FILE)


@dataclass(frozen=True)
class Holder:
    """The lease as it stands: who holds it, how long ago it was renewed, and its version."""

    run_id: str | None
    host: str | None
    pid: int | None
    token: str
    age_s: float
    version: Any  # S3: the etag; locally: (st_dev, st_ino) of the file
    record: dict[str, Any]

    @property
    def who(self) -> str:
        return f"run {self.run_id} on host {self.host}" if self.run_id else "a run that left no name"

    def describe(self) -> str:
        return f"{self.who} (lease renewed {self.age_s:.0f} s ago)"


class _Lost(Exception):
    """A renewal found the lease gone or held by another run."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:_REASON_CHARS]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _record(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:  # a lease whose creator died before writing it: nameless until stale
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict[str, Any], fallback_token: str, age_s: float, version: Any) -> Holder:
    pid = record.get("pid")
    return Holder(run_id=record.get("run_id"), host=record.get("host"), pid=pid if isinstance(pid, int) else None,
                  token=str(record.get("token") or fallback_token), age_s=max(0.0, age_s), version=version,
                  record=record)


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# Stores: the same five operations on a local folder and on S3


class _LocalStore:
    def __init__(self, uri: str) -> None:
        self.path = storage.absolute(uri)
        self.folder = os.path.dirname(self.path)

    def create(self, record: dict[str, Any]) -> int | None:
        """The open descriptor of a lease we created, or None when one exists.

        The lease is written whole to a temporary file and hard-linked to its name (exclusive,
        like `O_EXCL`, and never seen empty by a racer); `O_CREAT | O_EXCL` and then the write
        where the filesystem has no hard links.
        """
        os.makedirs(self.folder, exist_ok=True)
        fd, tmp = self._written(record)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                os.close(fd)
                raise
            os.close(fd)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            os.write(fd, _encode(record))
            os.fsync(fd)
        finally:
            self._unlink(tmp)
        return fd

    def _written(self, record: dict[str, Any]) -> tuple[int, str]:
        """A temporary file beside the lease holding `record`, synced: its descriptor and path."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f"{LEASE_FILE}.tmp-")
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, _encode(record))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink(tmp)
            raise
        return fd, tmp

    def read(self) -> Holder | None:
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                data = handle.read()
        except FileNotFoundError:
            return None
        return _holder(_record(data), f"inode{st.st_ino}", time.time() - st.st_mtime, (st.st_dev, st.st_ino))

    def take_over(self, stale: Holder, record: dict[str, Any], stale_after_s: float) -> int | None:
        """Our descriptor once our lease replaced `stale`; None when it changed or another run is at it."""
        claim = self._claim(stale.token, stale_after_s)
        if claim is None:
            return None
        try:
            now = self.read()
            if now is None or now.version != stale.version or now.age_s < stale_after_s:
                return None  # renewed, released or replaced since we judged it
            fd, tmp = self._written(record)
            try:
                os.replace(tmp, self.path)
            except BaseException:
                os.close(fd)
                self._unlink(tmp)
                raise
            self._drop_claims(stale.token)
            return fd
        finally:
            self._unlink(claim)

    def renew(self, fd: int, record: dict[str, Any]) -> int:
        os.utime(fd)  # our own inode only: never a successor's lease
        own = os.fstat(fd)
        now = self.read()
        if now is None:
            raise _Lost("the lease file was deleted")
        if now.version != (own.st_dev, own.st_ino):
            raise _Lost(f"taken over by {now.describe()}")
        return fd

    def release(self, fd: int, token: str, stale_after_s: float) -> None:
        own = os.fstat(fd)
        try:
            claim = self._claim(token, stale_after_s)
            if claim is None:
                return  # a taker holds the claim on our (stale) lease: it is no longer ours
            try:
                now = self.read()
                if now is not None and now.version == (own.st_dev, own.st_ino):
                    os.unlink(self.path)
                self._drop_claims(token)
            finally:
                self._unlink(claim)
        finally:
            os.close(fd)

    def _claim_name(self, token: str, level: int) -> str:
        return f"{self.path}.{re.sub(r'[^A-Za-z0-9_-]', '_', token)[:64]}.claim{level}"

    def _claim(self, token: str, stale_after_s: float) -> str | None:
        """The claim file we created on the lease generation `token`, or None when another
        process holds a live claim on it (or every level was left behind by dead claimers)."""
        for level in range(1, CLAIM_LEVELS + 1):
            name = self._claim_name(token, level)
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return name
            except FileExistsError:
                try:
                    age = time.time() - os.stat(name).st_mtime
                except FileNotFoundError:
                    return None  # its claimer just finished: the lease has changed
                if age < stale_after_s:
                    return None
        return None

    def _drop_claims(self, token: str) -> None:
        for level in range(1, CLAIM_LEVELS + 1):
            self._unlink(self._claim_name(token, level))

    @staticmethod
    def _unlink(name: str) -> None:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def _s3_code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs exception ('' when there is none)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        seen = seen.__cause__
    return ""


def _lost_race(exc: BaseException) -> bool:
    """A conditional write refused because the object changed (412), or a concurrent one (409)."""
    return isinstance(exc, FileExistsError) or _s3_code(exc) in ("PreconditionFailed", "412",
                                                                 "ConditionalRequestConflict", "409")


class _S3Store:
    def __init__(self, uri: str) -> None:
        self.fs, path = storage.filesystem(uri)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def _put(self, record: dict[str, Any], **condition: str) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=_encode(record),
                              ContentType="application/json", **condition)
        return out["ETag"]

    def create(self, record: dict[str, Any]) -> str | None:
        try:
            etag = self._put(record, IfNoneMatch="*")
        except OSError as exc:
            if _lost_race(exc):
                return None
            raise
        now = self.read()  # read back: a store that applies conditions loosely shows the winner here
        return etag if now is not None and now.token == record["token"] else None

    def read(self) -> Holder | None:
        from fsspec.asyn import sync

        async def get() -> tuple[dict[str, Any], bytes] | None:
            try:
                answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            async with answer["Body"] as body:
                return answer, await body.read()

        got = sync(self.fs.loop, get)
        if got is None:
            return None
        answer, data = got
        date = answer["ResponseMetadata"]["HTTPHeaders"].get("date")
        age = (parsedate_to_datetime(date) - answer["LastModified"]).total_seconds() if date else 0.0
        return _holder(_record(data), answer["ETag"], age, answer["ETag"])

    def take_over(self, stale: Holder, record: dict[str, Any], stale_after_s: float) -> str | None:
        try:
            etag = self._put(record, IfMatch=stale.version)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or _lost_race(exc):
                return None  # released, or another run was faster
            raise
        now = self.read()
        return etag if now is not None and now.token == record["token"] else None

    def renew(self, etag: str, record: dict[str, Any]) -> str:
        try:
            return self._put(record, IfMatch=etag)
        except OSError as exc:
            if not (isinstance(exc, FileNotFoundError) or _lost_race(exc)):
                raise
        now = self.read()
        if now is None:
            raise _Lost("the lease object was deleted")
        if now.token == record["token"] and now.record.get("renewals") == record["renewals"]:
            return now.version  # our own write, retried after an answer that was lost
        raise _Lost(f"taken over by {now.describe()}")

    def release(self, etag: str, token: str, stale_after_s: float) -> None:
        now = self.read()
        if now is None or now.version != etag:
            return  # gone or no longer ours: leave the successor's lease alone
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except OSError as exc:
            if not (isinstance(exc, FileNotFoundError) or _lost_race(exc)):
                raise


def _store(uri: str) -> _LocalStore | _S3Store:
    if storage.is_local(uri):
        return _LocalStore(uri)
    if storage.scheme(uri) in ("s3", "s3a"):
        return _S3Store(uri)
    raise InputError(uri, "a run's lease needs a local folder, file:// or s3:// output")


# ---------------------------------------------------------------------------------------------
# The lease


class Lease:
    """A held lease, renewed by a daemon thread until `release`. `lost` (with `reason`) turns
    True once a renewal finds it taken or gone, or once renewals have been failing (or one has
    been stuck in retries) for so long that another run may judge the lease stale."""

    def __init__(self, output: str, store: _LocalStore | _S3Store, handle: Any, record: dict[str, Any]) -> None:
        self.output, self.uri = output, lease_uri(output)
        self.run_id, self.token = record["run_id"], record["token"]
        self.heartbeat_s, self.stale_after_s = record["heartbeat_s"], record["stale_after_s"]
        self._store, self._handle, self._record = store, handle, record
        self._lock = threading.Lock()  # held by the renewal in flight
        self._stop = threading.Event()
        self._renewed = time.monotonic()  # the last renewal that got through
        self._attempt: tuple[float, bool | None] = (self._renewed, True)  # last attempt: start, ok (None: in flight)
        self._released = False
        self._lost = False
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        if not self._lost and not self._released:
            now = time.monotonic()
            started, ok = self._attempt
            troubled = ok is False or (ok is None and now - started >= self.heartbeat_s)
            if troubled and now - self._renewed + self.heartbeat_s >= self.stale_after_s:
                self._lose(f"could not renew for {now - self._renewed:.0f} s (the store did not answer); "
                           "another run may take it over")
        return self._lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.renew():
                return

    def renew(self, timeout: float | None = None) -> bool:
        """Renew now (waiting at most `timeout` s for a renewal in flight); False once lost or released."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return not self.lost
        try:
            if self._lost or self._released:
                return False
            record = dict(self._record, renewals=self._record.get("renewals", 0) + 1, renewed_at=utc_iso())
            self._attempt = (time.monotonic(), None)
            try:
                self._handle = self._store.renew(self._handle, record)
            except _Lost as lost:
                self._lose(str(lost))
                return False
            except Exception:  # the store did not answer: the lease holds until `lost` says otherwise
                self._attempt = (self._attempt[0], False)
                return not self.lost
            self._attempt = (self._attempt[0], True)
            if self.lost:  # given up while this renewal was in retries: stay lost
                return False
            self._record = record
            self._renewed = time.monotonic()
            return True
        finally:
            self._lock.release()

    def _lose(self, reason: str) -> None:
        self._lost, self.reason = True, reason
        self._stop.set()

    def check(self) -> None:
        """Raise InputError if the lease is lost; renew first when a renewal is overdue (this
        process may have been frozen), so a writer calling it before each write stops in time."""
        if not self.lost and time.monotonic() - self._renewed > 1.5 * self.heartbeat_s:
            self.renew(timeout=self.heartbeat_s)
        if self.lost:
            raise InputError(self.output, f"this run ({self.run_id}) lost its lease {self.uri}: {self.reason}; "
                                          "it stopped writing")

    def release(self) -> None:
        """Stop renewing and delete the lease if the store still shows it as ours (idempotent).

        Best effort: when a renewal is stuck in retries or the store does not answer, the lease
        is left to go stale by itself.
        """
        self._stop.set()
        if not self._lock.acquire(timeout=self.heartbeat_s):
            self._released = True
            self.reason = self.reason or "released while a renewal was stuck: the lease goes stale by itself"
            return
        try:
            if self._released:
                return
            self._released = True
            try:
                self._store.release(self._handle, self.token, self.stale_after_s)
            except Exception as exc:
                self.reason = self.reason or f"release failed, the lease goes stale by itself ({_reason(exc)})"
        finally:
            self._lock.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stale_after(current: Holder, ours: float) -> float:
    """The age at which `current` is stale: ours, or the longer one its holder declared."""
    declared = current.record.get("stale_after_s")
    return max(ours, float(declared)) if isinstance(declared, (int, float)) else ours


def holder(output: str) -> Holder | None:
    """The lease on `output` as it stands now, or None when no run holds one."""
    return _store(lease_uri(output)).read()


def hold(output: str, run_id: str, heartbeat_s: float, say: Callable[[str], None]) -> Lease:
    """The output's lease for a run. A lease a crashed run left goes stale within its heartbeats:
    wait for that (at most one heartbeat past staleness); a live run keeps renewing, and this run
    is refused with the holder's name."""
    deadline = time.monotonic() + heartbeat_s * (STALE_HEARTBEATS + 1)
    while True:
        try:
            return acquire(output, run_id, heartbeat_s=heartbeat_s)
        except InputError:
            current = holder(output)
            if current is not None and time.monotonic() > deadline:
                raise
            if current is not None:
                say(f"waiting for the lease of {current.who} on {output} (renewed {current.age_s:.0f} s ago): "
                    "it is released when that run ends, taken over once it is stale")
                time.sleep(min(heartbeat_s, 10.0))


def acquire(output: str, run_id: str, heartbeat_s: float = HEARTBEAT_S, stale_heartbeats: int = STALE_HEARTBEATS) -> Lease:
    """Take the lease on `output` for `run_id`, or raise InputError naming the live run that holds it.

    A lease older than `stale_heartbeats` x `heartbeat_s` is taken over (its run died). Store
    failures that outlast the S3 retries become InputError naming the lease (raised from the
    cause, so `storage.is_retryable` can tell a 5xx).
    """
    if heartbeat_s <= 0 or stale_heartbeats < 2:
        raise InputError(output, f"lease heartbeat {heartbeat_s:g} s x {stale_heartbeats}: needs a positive "
                                 "heartbeat and at least 2 heartbeats before a lease is stale")
    uri = lease_uri(output)
    store = _store(uri)
    stale_after_s = heartbeat_s * stale_heartbeats
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
              "acquired_at": utc_iso(), "heartbeat_s": heartbeat_s, "stale_after_s": stale_after_s, "renewals": 0}
    current: Holder | None = None
    try:
        for attempt in range(ACQUIRE_ROUNDS):
            if attempt:
                time.sleep(min(0.2 * attempt, heartbeat_s))  # another run is mid-change: let it finish
            handle = store.create(record)
            if handle is not None:
                return Lease(output, store, handle, record)
            current = store.read()
            if current is None:
                continue  # released between our create and our read
            if isinstance(store, _S3Store) and current.token == record["token"]:
                return Lease(output, store, current.version, record)  # our PUT went through, its answer was lost
            limit = _stale_after(current, stale_after_s)
            if current.age_s < limit:
                break
            handle = store.take_over(current, record, limit)
            if handle is not None:
                return Lease(output, store, handle, record)
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(output, f"cannot take the lease {uri}: {_reason(exc)}") from exc
    if current is not None and current.age_s < _stale_after(current, stale_after_s):
        raise InputError(output, f"{current.who} is writing here (lease renewed {current.age_s:.0f} s ago); "
                                 "wait for it or use another --output")
    raise InputError(output, f"the lease {uri} kept changing hands while this run tried to take it "
                             f"({ACQUIRE_ROUNDS} attempts); if no run is writing here, delete {uri}* and retry")
