"""Each stable reason code in plain words, for people: the viewer (serve/viewer) and the scoring report
(:mod:`kdray.report`) show these beside the code. One dictionary, so both say the same thing; the codes come
from the image loader (:mod:`kdray.images`) and the serving routes and middlewares (:mod:`serve`)."""

from __future__ import annotations

from kdray import images

PLAIN_WORDS: dict[str, str] = {
    # the image loader: scoring and serving
    images.NOT_AN_IMAGE: "not an image kdray reads (PNG, JPEG, TIFF, BMP, WebP or DICOM)",
    images.TRUNCATED: "the file is cut off before its end",
    images.TOO_SMALL: "the image is too small to be a chest X-ray",
    images.TOO_LARGE: "the image has more pixels than allowed",
    images.FILE_TOO_LARGE: "the file is larger than allowed",
    images.UNSUPPORTED_DICOM: "a DICOM image this installation cannot decode (its transfer syntax or layout)",
    images.NO_PIXELS: "a DICOM object without an image (a report, a directory, a presentation state)",
    images.WRONG_MODALITY: "a DICOM image of a modality this model does not read (it reads CR and DX)",
    images.IO_ERROR: "the file could not be read this time (a re-run retries it)",
    images.CORRUPT: "the image's content cannot be decoded",
    images.MISSING: "listed, but the file is not there",
    images.FORBIDDEN: "the job's credentials may not read the file",
    images.OUTSIDE_ROOTS: "the file lies outside the folders the job may read",
    images.NOT_A_FILE: "not a regular file (a link, device or folder): never opened",
    images.SPARSE_MEMBER: "a sparse archive member, whose holes would read as zeros",
    # serving
    "request_decode_budget": "decoding the request's images would cost more than allowed",
    "body_too_large": "the upload is larger than this server accepts",
    "body_timeout": "the upload did not arrive in time",
    "request_timeout": "the server did not answer in time",
    "unsupported_media_type": "the server does not take this kind of file",
    "no_file": "the request holds no file",
    "bad_parameter": "a request parameter is not valid",
    "not_dicom": "a DICOM answer was asked for a file that is not DICOM",
    "bad_dicom_header": "the DICOM header lacks what a result must copy from it",
    "overloaded": "the server is busy",
    "explain_busy": "too many explanations are being computed right now",
    "explain_unavailable": "this model cannot explain its answers (its export has no torch weights)",
    "auth_required": "this server needs an access token",
    "auth_invalid": "the access token was not accepted",
    "origin_not_allowed": "requests from this page's site are not allowed",
    "host_not_allowed": "this server does not answer for that name",
}


def plain_words(reason: str) -> str:
    return PLAIN_WORDS.get(reason, "refused")
