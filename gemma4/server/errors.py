"""The error objects (OpenAI's, and Anthropic's for the Messages API), and the messages of request
validation in one line."""

from __future__ import annotations


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Anthropic names an error by its kind where OpenAI gives a type and a code; the status decides it.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line naming the first bad field, and that field."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union reports each member; its first member's path is the one users mean
    loc = [p for p in loc if not (p.lower().startswith(("list[", "dict[", "literal[", "function-")) or p in
                                  ("str", "int", "float", "bool", "NamedToolChoice", "constrained-str"))]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"{param}: a required field is missing", param
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param
