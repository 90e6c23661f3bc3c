"""The JSON API: sign up, confirm an address and look up users (quart-schema,
OpenAPI at /openapi.json)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from quart import Blueprint, Request, request
from quart_schema import (
    RequestSchemaValidationError,
    document_request,
    document_response,
    tag,
    validate_response,
)
from werkzeug.exceptions import BadRequest, Gone, HTTPException, NotFound, UnsupportedMediaType

from .confirm import ConfirmTokenError
from .users import clean_email, clean_name, confirm, get_user, resend_confirmation, sign_up

__all__ = ["JSONErrorsRequest", "api"]

api = Blueprint("api", __name__, url_prefix="/api")

RESENT = (
    "If a sign-up with this address is waiting to be confirmed, "
    "a new confirmation mail is on its way."
)


class JSONErrorsRequest(Request):
    """Quart's request, answering every malformed JSON body with a 400 that says
    what is wrong (Quart gives a bare "Bad Request" outside debug mode, and a
    500 for a body that is not UTF-8 or is nested too deeply), and a charset
    other than UTF-8 with a 415."""

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if force or self.is_json:
            # JSON between systems is UTF-8 (RFC 8259, 8.1); application/json
            # defines no charset parameter (RFC 8259, 11), so only UTF-8's
            # own name is tolerated.
            charset = self.mimetype_params.get("charset", "utf-8").lower()
            if charset not in ("utf-8", "utf8"):
                if silent:
                    return None
                raise UnsupportedMediaType(
                    f"JSON must be encoded in UTF-8, not {charset!r} (RFC 8259, 8.1)."
                )
        try:
            return await super().get_json(force, silent, cache)
        except (UnicodeDecodeError, RecursionError) as error:
            # Raised outside Quart's own handling of malformed JSON: decoding
            # the body as text, and the parser's recursion limit.
            if silent:
                return None
            return self.on_json_loading_failed(error)

    def on_json_loading_failed(self, error: Exception) -> Any:
        if isinstance(error, UnicodeDecodeError):
            raise BadRequest(
                f"The request body is not valid UTF-8: {error.reason} at byte {error.start}."
            )
        if isinstance(error, RecursionError):
            raise BadRequest("The request body is JSON nested too deeply.")
        raise BadRequest(f"The request body is not valid JSON: {error}")


@api.before_request
async def require_json() -> tuple[dict[str, Any], int] | None:
    # quart-schema would report a non-JSON body as "not a valid NewUser".
    if request.method in ("POST", "PUT", "PATCH") and not request.is_json:
        return {"error": "The request body must be JSON (Content-Type: application/json)."}, 400
    return None


Body = TypeVar("Body", bound=BaseModel)
Params = ParamSpec("Params")
Result = TypeVar("Result")


def validate_json(
    model: type[Body],
) -> Callable[
    [Callable[Concatenate[Body, Params], Awaitable[Result]]], Callable[Params, Awaitable[Result]]
]:
    """quart-schema's ``validate_request(model)``: the JSON body validated as *model*,
    given to the view as ``data``, in the OpenAPI document, and a
    :class:`~quart_schema.RequestSchemaValidationError` when it is not valid. By the
    model's own validator: quart-schema 0.25 builds a pydantic TypeAdapter for it on
    every request."""

    def decorator(
        view: Callable[Concatenate[Body, Params], Awaitable[Result]],
    ) -> Callable[Params, Awaitable[Result]]:
        @wraps(view)
        async def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
            body = await request.get_json()
            try:
                data = model.model_validate(body)
            except (ValidationError, TypeError, ValueError) as error:  # as quart-schema's
                raise RequestSchemaValidationError(error) from None
            return await view(data, *args, **kwargs)

        return document_request(model)(wrapper)

    return decorator


class NewUser(BaseModel):
    """A sign-up: the visitor's name, 1 to 64 characters once trimmed, and
    optionally an e-mail address to confirm (at most 254 characters)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, AfterValidator(clean_name)]
    email: Annotated[str, AfterValidator(clean_email)] | None = None


class Resend(BaseModel):
    """The address a confirmation mail should be sent to again."""

    model_config = ConfigDict(extra="forbid", strict=True)

    email: Annotated[str, AfterValidator(clean_email)]


class Token(BaseModel):
    """A confirmation token, from the link in the confirmation mail."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token: str


class Accepted(BaseModel):
    """What happens next."""

    message: str


class UserOut(BaseModel):
    """A user."""

    id: int
    name: str


class Error(BaseModel):
    """What went wrong."""

    error: str
    errors: list[dict[str, Any]] | None = None


# validate_response checks what a view returns; the error statuses come from the error
# handlers below, which it never sees: they are documented only (no wrapper per request).
@api.post("/users")
@tag(["users"])
@validate_json(NewUser)
@validate_response(UserOut, 201)
@validate_response(UserOut, 200)
@document_response(Error, 422)
@document_response(Error, 429)
async def create_user(data: NewUser) -> tuple[UserOut, int]:
    """Sign up: 201 and a mail to the administrator for a new name, 200 for a known one.

    With an ``email``, a new user is also sent a confirmation mail; the answer
    does not say whether anyone else gave that address. 429 when the address
    had 3 confirmation mails, or the client 20 sign-ups with an address, in
    the last hour (the settings' defaults): nothing is stored or sent.
    """
    user, created = await sign_up(data.name, data.email)
    return UserOut(id=user.id, name=user.username), 201 if created else 200


@api.post("/confirm")
@tag(["users"])
@validate_json(Token)
@validate_response(UserOut, 200)
@document_response(Error, 400)
@document_response(Error, 410)
@document_response(Error, 422)
async def confirm_address(data: Token) -> UserOut:
    """Confirm the address a confirmation token was mailed to: 200 and the
    user (again for a confirmed one), 400 for a token that is not valid, 410
    for an expired one."""
    try:
        user = await confirm(data.token)
    except ConfirmTokenError as error:
        if error.expired:
            raise Gone(str(error)) from None
        raise BadRequest(str(error)) from None
    return UserOut(id=user.id, name=user.username)


@api.post("/confirm/resend")
@tag(["users"])
@validate_json(Resend)
@validate_response(Accepted, 202)
@document_response(Error, 422)
@document_response(Error, 429)
async def resend(data: Resend) -> tuple[Accepted, int]:
    """Send a new confirmation mail: 202 whether or not a sign-up waits on the
    address (the answer tells a stranger nothing), 429 past the limits."""
    await resend_confirmation(data.email)
    return Accepted(message=RESENT), 202


@api.get("/users/<int:user_id>")
@tag(["users"])
@validate_response(UserOut, 200)
@document_response(Error, 404)
async def read_user(user_id: int) -> UserOut:
    """One user, by id."""
    user = await get_user(user_id)
    if user is None:
        raise NotFound(f"No user with id {user_id}.")
    return UserOut(id=user.id, name=user.username)


@api.errorhandler(RequestSchemaValidationError)
async def invalid_body(error: RequestSchemaValidationError) -> tuple[dict[str, Any], int]:
    cause = error.validation_error
    if hasattr(cause, "errors"):
        # Without the context and input: a validator's ValueError object is
        # not JSON, and the input may be large.
        details = cause.errors(include_url=False, include_context=False, include_input=False)
        return {"error": "The request body is not valid.", "errors": details}, 422
    return {"error": f"The request body is not valid: {cause}"}, 422


@api.errorhandler(HTTPException)
async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
    # Malformed JSON, a wrong method, a missing user...: JSON, not an HTML page.
    return {"error": error.description or error.name}, error.code or 500
