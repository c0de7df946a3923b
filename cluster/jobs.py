"""Ray jobs on a running cluster: submit, status, logs (tail or follow), stop and list, each failure one line.

A thin layer over ``ray.job_submission.JobSubmissionClient`` that talks to the dashboard's HTTP address
(``http://HOST:8265``), not the GCS port. It adds what the raw client lacks for a command line: an explicit
address always wins over ``RAY_ADDRESS``, an unreachable host fails within seconds instead of hanging on TCP,
and Ray's multi-line errors become ``JobsError`` with one line.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CONNECT_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.5
# The client logs every package upload and websocket close at INFO on stderr; keep stderr for errors.
CHATTY_RAY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                      "ray._private.runtime_env.packaging")


class JobsError(RuntimeError):
    """A jobs-API failure explained in one line (the CLI prints it and exits with code 2)."""


@dataclass
class JobSummary:
    job_id: str
    status: str
    entrypoint: str = ""
    message: str = ""
    start_time: Optional[float] = None  # seconds since the epoch
    end_time: Optional[float] = None
    metadata: dict = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATES


def resolve_address(address: Optional[str]) -> str:
    """The explicit address, else the first dashboard URL found in the environment."""
    if not address:
        address = next((os.environ[v] for v in ADDRESS_ENV_VARS
                        if os.environ.get(v, "").startswith(("http://", "https://"))), None)
    if not address:
        raise JobsError("no cluster address: pass cluster.address=http://HOST:8265 (the Ray dashboard) "
                        "or export RAY_API_SERVER_ADDRESS")
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobsError(f"'{address}' is not a dashboard address; use http://HOST:8265 "
                        f"(the Ray dashboard port, not the GCS port or ray://)")
    return address.rstrip("/")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once unless an HTTP server answers at ``address`` within ``timeout_s`` (Ray's client would wait
    without a limit on an address that accepts connections but never replies)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=timeout_s).close()
    except urllib.error.HTTPError:  # it answers (e.g. 401 without a token): the jobs API says the rest
        return
    except (urllib.error.URLError, OSError) as err:
        cause = getattr(err, "reason", err)
        if isinstance(cause, (socket.timeout, TimeoutError)):
            reason = f"no reply within {timeout_s:g}s"
        else:
            reason = getattr(cause, "strerror", None) or str(cause)
        raise JobsError(f"cannot reach the Ray dashboard at {address}: {reason.lower()}") from None


@contextlib.contextmanager
def _env_without(names: tuple[str, ...]) -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS/RAY_ADDRESS over its argument; hide them while it resolves."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


class JobsClient:
    """One cluster's jobs API. Every public method raises only ``JobsError``."""

    def __init__(self, address: Optional[str] = None, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.address = resolve_address(address)
        check_reachable(self.address, connect_timeout_s)
        from ray.job_submission import JobSubmissionClient

        for name in CHATTY_RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        with self._errors(), _env_without(ADDRESS_ENV_VARS):
            self._client = JobSubmissionClient(self.address)

    @contextlib.contextmanager
    def _errors(self, job_id: Optional[str] = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except JobsError:
            raise
        except AuthenticationError:
            raise JobsError(f"the cluster at {self.address} requires token auth: export RAY_AUTH_MODE=token "
                            f"(token from ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError):
            raise JobsError(f"cannot reach the Ray dashboard at {self.address}") from None
        except Exception as err:  # noqa: BLE001 - Ray raises bare RuntimeErrors carrying HTTP status text
            text = str(err)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise JobsError(f"unknown job '{job_id}' on {self.address}") from None
            raise JobsError(f"{self.address}: {_first_line(text) or type(err).__name__}") from None

    def submit(self, entrypoint: str, runtime_env: dict, submission_id: Optional[str] = None,
               metadata: Optional[dict[str, str]] = None) -> str:
        with self._errors():
            return self._client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                           submission_id=submission_id, metadata=metadata)

    def status(self, job_id: str) -> JobSummary:
        with self._errors(job_id):
            return _summary(self._client.get_job_info(job_id))

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> JobSummary:
        """Stream the job's log to ``write`` until it ends; returns its final state."""
        self.status(job_id)  # an unknown id is a clean error here, a websocket handshake error below

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        with self._errors(job_id):
            asyncio.run(tail())
        return self.wait(job_id)

    def wait(self, job_id: str, timeout_s: Optional[float] = None) -> JobSummary:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        summary = self.status(job_id)
        while not summary.is_terminal and (deadline is None or time.monotonic() < deadline):
            time.sleep(POLL_INTERVAL_S)
            summary = self.status(job_id)
        return summary

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False if it had already ended."""
        with self._errors(job_id):
            return self._client.stop_job(job_id)

    def list(self) -> list[JobSummary]:
        with self._errors():
            jobs = [_summary(info) for info in self._client.list_jobs()]
        return sorted(jobs, key=lambda job: job.start_time or 0.0)


def _summary(info) -> JobSummary:
    def seconds(ms: Optional[int]) -> Optional[float]:
        return ms / 1000.0 if ms else None

    status = getattr(info.status, "value", str(info.status))
    return JobSummary(job_id=info.submission_id or info.job_id or "?", status=status,
                      entrypoint=info.entrypoint or "", message=_first_line(info.message or ""),
                      start_time=seconds(info.start_time), end_time=seconds(info.end_time),
                      metadata=dict(info.metadata or {}))
