"""A PACS as a scoring input (QIDO-RS lists the instances, paged; WADO-RS retrieves each one, bounded) and as the
place results go (STOW-RS).

``dicomweb+http://host:port/dicom-web?Modality=DX&StudyDate=20260101-20261231`` (or ``dicomweb+https``): the
query string goes to QIDO-RS ``/instances`` as it is. Credentials come from the environment
(``KDRAY_DICOMWEB_USER`` and ``KDRAY_DICOMWEB_PASSWORD``, HTTP basic), never from the URI: a URI with a user
part is refused, as URIs are logged and written into results.

What a PACS answers is untrusted like any input: each QIDO page and each instance is read up to a byte limit
before it is parsed, UIDs are checked before they go into a URL, and an answer that is not what was asked for is
a refusal with a reason code. A PACS that is away (connection error, timeout, 5xx) is retried with backoff and
then reported as ``io_error``, which leaves the shard for a re-run (and many in a row stop the job).

Storing (:func:`store`) retries the same way; a PACS that refuses an object, or is still away, stops the job
before the shard is marked done, so a re-run stores it again. kdray's result UIDs come from the source's
(:func:`kdray.dicom_results.result_uids`): storing again replaces, never adds.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from kdray import KdrayError
from kdray.images import FILE_TOO_LARGE, FORBIDDEN, MISSING, NOT_AN_IMAGE, ImageRefused

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
USER_ENV, PASSWORD_ENV = "KDRAY_DICOMWEB_USER", "KDRAY_DICOMWEB_PASSWORD"
PAGE = 500  # instances per QIDO-RS request: bounded memory per page, whatever the archive's size
MAX_PAGE_BYTES = 32 * 2**20
MAX_INSTANCES = 2_000_000
TIMEOUT_S = (5.0, 60.0)  # connect, read
RETRIES, BACKOFF_S = 3, 0.5
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TAGS = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STORE_MAX_OBJECTS, STORE_MAX_BYTES = 64, 32 * 2**20  # per STOW-RS request
MAX_ANSWER_BYTES = 2**20  # a STOW-RS answer: one status item per object
_FAILED_SOP_SEQUENCE = "00081198"


class PacsUnavailable(OSError):
    """The PACS did not answer after the retries (an io_error: the shard stays for a re-run)."""


@dataclass(frozen=True)
class Endpoint:
    base: str  # http(s)://host:port/prefix, no trailing slash
    query: tuple[tuple[str, str], ...]

    def instance_url(self, entry: str) -> str:
        study, series, sop = check_entry(entry)
        return f"{self.base}/studies/{study}/series/{series}/instances/{sop}"


def is_dicomweb(uri: str) -> bool:
    return uri.lower().startswith(SCHEMES)


def parse(uri: str, what: str = "input") -> Endpoint:
    if not is_dicomweb(uri):
        raise KdrayError(f"not a DICOMweb {what}: it starts with {' or '.join(SCHEMES)}")
    parts = urlsplit(uri[len("dicomweb+"):])
    if parts.username or parts.password:
        raise KdrayError(f"a DICOMweb URI carries no credentials (URIs are logged): set {USER_ENV} and "
                         f"{PASSWORD_ENV} instead")
    if not parts.hostname:
        raise KdrayError("a DICOMweb URI needs a host: dicomweb+http://host:port/dicom-web?Modality=DX")
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    reserved = {k for k, _ in query} & {"limit", "offset"}
    if reserved:
        raise KdrayError(f"the DICOMweb query sets {', '.join(sorted(reserved))}: kdray pages through QIDO-RS itself")
    return Endpoint(f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", query)


def parse_store(uri: str) -> Endpoint:
    """Where results are stored: a DICOMweb root without a query (``dicomweb+http://host:port/dicom-web``)."""
    endpoint = parse(uri, "store")
    if endpoint.query:
        raise KdrayError("a DICOMweb store is a root (dicomweb+http://host:port/dicom-web), without a query")
    return endpoint


def check_entry(entry: str) -> tuple[str, str, str]:
    """``study/series/sop`` UIDs, each checked (digits and dots, at most 64 characters) before any URL has it."""
    uids = entry.split("/")
    if len(uids) != 3 or not all(len(u) <= 64 and _UID.fullmatch(u) for u in uids):
        raise ImageRefused(NOT_AN_IMAGE, "not a study/series/instance UID triple")
    return uids[0], uids[1], uids[2]


def session():
    """A requests session with the environment's credentials (none: anonymous)."""
    import requests

    s = requests.Session()
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user:
        s.auth = (user, password or "")
    return s


def _get(s, url: str, max_bytes: int, **kwargs) -> tuple[int, str, bytes]:
    return _request(s, "GET", url, max_bytes, **kwargs)


def _request(s, method: str, url: str, max_bytes: int, **kwargs) -> tuple[int, str, bytes]:
    """A request with retries on a PACS that is away; the answer read up to ``max_bytes`` (+1 to see that it is
    over). (Retrying a STOW-RS is safe: the same objects again replace themselves.)"""
    import requests

    for attempt in range(RETRIES + 1):
        try:
            with s.request(method, url, stream=True, timeout=TIMEOUT_S, **kwargs) as resp:
                if resp.status_code < 500:
                    body = resp.raw.read(max_bytes + 1, decode_content=True)
                    return resp.status_code, resp.headers.get("content-type", ""), body
                failure = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            failure = type(exc).__name__
        if attempt < RETRIES:
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise PacsUnavailable(f"the PACS did not answer ({failure}) after {RETRIES + 1} tries")


def list_instances(endpoint: Endpoint, s=None) -> list[str]:
    """Every instance the query matches, as sorted unique ``study/series/sop`` entries (QIDO-RS, paged)."""
    s = s or session()
    entries: set[str] = set()
    offset = 0
    while True:
        url = f"{endpoint.base}/instances?" + urlencode([*endpoint.query, ("limit", PAGE), ("offset", offset)])
        status, _, body = _get(s, url, MAX_PAGE_BYTES, headers={"accept": "application/dicom+json"})
        if status in (401, 403):
            raise KdrayError(f"the PACS refused the query (HTTP {status}): check {USER_ENV} and {PASSWORD_ENV}")
        if status == 204 or (status == 200 and not body.strip()):
            break
        if status != 200:
            raise KdrayError(f"the PACS answered the query with HTTP {status}")
        if len(body) > MAX_PAGE_BYTES:
            raise KdrayError(f"a QIDO-RS page of {PAGE} instances is over {MAX_PAGE_BYTES // 2**20} MiB: not read")
        page = _page(body)
        if not page:
            break
        before = len(entries)
        entries.update(page)
        if len(entries) > MAX_INSTANCES:
            raise KdrayError(f"the query matches over {MAX_INSTANCES} instances: narrow it (StudyDate=...)")
        if len(entries) == before:  # a PACS that ignores offset would page forever
            break
        offset += len(page)
    return sorted(entries)


def _page(body: bytes) -> list[str]:
    try:
        items = json.loads(body)
    except ValueError:
        raise KdrayError("the PACS's QIDO-RS answer is not JSON") from None
    if not isinstance(items, list):
        raise KdrayError("the PACS's QIDO-RS answer is not a list of instances")
    out = []
    for item in items:
        try:
            uids = [str(item[_TAGS[k]]["Value"][0]) for k in ("study", "series", "sop")]
        except (KeyError, IndexError, TypeError):
            continue  # an instance without its three UIDs cannot be retrieved
        entry = "/".join(uids)
        try:
            check_entry(entry)
        except ImageRefused:
            continue
        out.append(entry)
    return out


def retrieve(endpoint: Endpoint, entry: str, max_bytes: int, s=None) -> bytes:
    """One instance's DICOM file (WADO-RS), read up to ``max_bytes``; refusals with reason codes."""
    url = endpoint.instance_url(entry)
    status, content_type, body = _get(s or session(), url, max_bytes + 64 * 1024,
                                      headers={"accept": RETRIEVE_ACCEPT})
    if status == 404:
        raise ImageRefused(MISSING, "the PACS no longer has this instance")
    if status in (401, 403):
        raise ImageRefused(FORBIDDEN, f"the PACS refused it (HTTP {status})")
    if status != 200:
        raise ImageRefused(NOT_AN_IMAGE, f"the PACS answered HTTP {status}")
    part = _first_part(content_type, body)
    if len(part) > max_bytes or len(body) > max_bytes + 64 * 1024:
        raise ImageRefused(FILE_TOO_LARGE, f"over the {max_bytes // 2**20} MiB limit; not read further")
    return part


def _first_part(content_type: str, body: bytes) -> bytes:
    """The first part of a multipart/related answer (WADO-RS), or the body itself for application/dicom."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/dicom":
        return body
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if media != "multipart/related" or not match:
        raise ImageRefused(NOT_AN_IMAGE, f"the PACS answered {media[:60] or 'no content type'}, not DICOM")
    delimiter = b"--" + match.group(1).encode("latin-1")
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start)
    if start < 0 or head_end < 0:
        raise ImageRefused(NOT_AN_IMAGE, "the PACS's multipart answer has no part")
    end = body.find(b"\r\n" + delimiter, head_end)
    return body[head_end + 4:end if end >= 0 else len(body)]


def store(endpoint: Endpoint, objects: list[bytes], s=None) -> None:
    """STOW-RS: DICOM files ``objects`` stored at the PACS, at most :data:`STORE_MAX_OBJECTS` or
    :data:`STORE_MAX_BYTES` per request. Raises :class:`KdrayError` when the PACS refuses any (the message names
    the HTTP status and how many failed, nothing of the objects), :class:`PacsUnavailable` when it is away."""
    s = s or session()
    for chunk in _store_chunks(objects):
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data)
                        for data in chunk) + b"--%s--\r\n" % boundary.encode()
        headers = {"content-type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "accept": "application/dicom+json"}
        status, _, answer = _request(s, "POST", f"{endpoint.base}/studies", MAX_ANSWER_BYTES, data=body,
                                     headers=headers)
        if status in (401, 403):
            raise KdrayError(f"the PACS refused to store results (HTTP {status}): check {USER_ENV} and "
                             f"{PASSWORD_ENV}")
        failed = _failed_count(answer)
        if status != 200 or failed:
            raise KdrayError(f"the PACS did not store {failed or len(chunk)} of {len(chunk)} result(s) "
                             f"(STOW-RS answered HTTP {status})")


def _store_chunks(objects: list[bytes]):
    chunk: list[bytes] = []
    size = 0
    for data in objects:
        if chunk and (len(chunk) >= STORE_MAX_OBJECTS or size + len(data) > STORE_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield chunk


def _failed_count(answer: bytes) -> int:
    """How many objects a STOW-RS answer (DICOM JSON) lists as failed; an answer that cannot be read lists none
    (its HTTP status decides)."""
    try:
        item = json.loads(answer) if answer.strip() and len(answer) <= MAX_ANSWER_BYTES else {}
    except ValueError:
        return 0
    failed = item.get(_FAILED_SOP_SEQUENCE, {}) if isinstance(item, dict) else {}
    values = failed.get("Value", []) if isinstance(failed, dict) else []
    return len(values) if isinstance(values, list) else 0
