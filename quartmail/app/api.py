"""The JSON API: sign up, confirm an address and look up users (quart-schema,
OpenAPI at /openapi.json)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from typing import Annotated, Any, Concatenate, Literal, ParamSpec, TypeVar, cast, overload

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from quart import Blueprint, Request, Response, current_app, request
from quart_schema import (
    RequestSchemaValidationError,
    ResponseSchemaValidationError,
    document_request,
    document_response,
    tag,
)
from werkzeug.exceptions import (
    BadRequest,
    Gone,
    HTTPException,
    NotFound,
    RequestTimeout,
    UnsupportedMediaType,
)

from .confirm import ConfirmTokenError
from .users import clean_email, clean_name, confirm, get_user, resend_confirmation, sign_up

__all__ = ["JSONErrorsRequest", "api", "json_response", "returns", "validate_json"]

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

    @overload
    async def get_data(
        self, cache: bool, as_text: Literal[False], parse_form_data: bool
    ) -> bytes: ...

    @overload
    async def get_data(self, cache: bool, as_text: Literal[True], parse_form_data: bool) -> str: ...

    @overload
    async def get_data(
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> str | bytes: ...

    async def get_data(
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> str | bytes:
        # As Quart's, bounded by asyncio.timeout instead of wait_for, which on Python
        # 3.11 runs the wait in a task of its own: two event-loop iterations per
        # request, even for a body that has all arrived (3.12's wait_for does not).
        if parse_form_data:
            await self._load_form_data()
        try:
            async with asyncio.timeout(self.body_timeout):
                raw_data: bytes = await self.body
        except TimeoutError as error:
            raise RequestTimeout() from error
        if not cache:
            self.body.clear()
        return raw_data.decode() if as_text else raw_data

    def on_json_loading_failed(self, error: Exception) -> Any:
        if isinstance(error, UnicodeDecodeError):
            raise BadRequest(
                f"The request body is not valid UTF-8: {error.reason} at byte {error.start}."
            )
        if isinstance(error, RecursionError):
            raise BadRequest("The request body is JSON nested too deeply.")
        raise BadRequest(f"The request body is not valid JSON: {error}")


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
    every request. A body that is not JSON at all is a 400 that says so."""

    def decorator(
        view: Callable[Concatenate[Body, Params], Awaitable[Result]],
    ) -> Callable[Params, Awaitable[Result]]:
        @wraps(view)
        async def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
            if not request.is_json:
                # quart-schema would report it as "not a valid NewUser".
                raise BadRequest("The request body must be JSON (Content-Type: application/json).")
            body = await request.get_json()
            try:
                data = model.model_validate(body)
            except (ValidationError, TypeError, ValueError) as error:  # as quart-schema's
                raise RequestSchemaValidationError(error) from None
            return await view(data, *args, **kwargs)

        return document_request(model)(wrapper)

    return decorator


def returns(
    model: type[BaseModel], *statuses: int
) -> Callable[[Callable[Params, Awaitable[Any]]], Callable[Params, Awaitable[Any]]]:
    """quart-schema's ``validate_response(model, status)`` for each of *statuses* (200
    when none is given), in one check: the view must answer an instance of *model*
    (built, so validated, by the view) with one of them, else a
    :class:`~quart_schema.ResponseSchemaValidationError` (a 500). In the OpenAPI
    document as quart-schema's would be. quart-schema's wraps the view once per status
    and validates anything but the model itself through a new pydantic TypeAdapter."""
    answered = statuses or (200,)

    def decorator(view: Callable[Params, Awaitable[Any]]) -> Callable[Params, Awaitable[Any]]:
        @wraps(view)
        async def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Any:
            result = await view(*args, **kwargs)
            value, status = (result[0], result[1]) if isinstance(result, tuple) else (result, 200)
            if type(value) is not model or status not in answered:
                raise ResponseSchemaValidationError(
                    TypeError(f"{view.__name__} answered {type(value).__name__} {status}")
                )
            return result

        # Documented in the order stacked validate_response decorators would list them.
        documented: Callable[Params, Awaitable[Any]] = wrapper
        for status in reversed(answered):
            documented = document_response(model, status)(documented)
        return documented

    return decorator


def json_response(
    body: dict[str, Any], status: int, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """*body* as the JSON response the app's JSON provider writes. For a plain dict
    (the errors), quart-schema's response conversion builds a pydantic TypeAdapter on
    every response; it passes a :class:`~quart.Response` through."""
    response = cast(Response, current_app.json.response(body))  # the app's response_class
    response.status_code = status
    response.headers.extend(headers)
    return response


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


# returns checks what a view returns; the error statuses come from the error handlers
# below, which it never sees: they are documented only (no wrapper per request).
@api.post("/users")
@tag(["users"])
@validate_json(NewUser)
@returns(UserOut, 201, 200)
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
@returns(UserOut, 200)
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
@returns(Accepted, 202)
@document_response(Error, 422)
@document_response(Error, 429)
async def resend(data: Resend) -> tuple[Accepted, int]:
    """Send a new confirmation mail: 202 whether or not a sign-up waits on the
    address (the answer tells a stranger nothing), 429 past the limits."""
    await resend_confirmation(data.email)
    return Accepted(message=RESENT), 202


@api.get("/users/<int:user_id>")
@tag(["users"])
@returns(UserOut, 200)
@document_response(Error, 404)
async def read_user(user_id: int) -> UserOut:
    """One user, by id."""
    user = await get_user(user_id)
    if user is None:
        raise NotFound(f"No user with id {user_id}.")
    return UserOut(id=user.id, name=user.username)


@api.errorhandler(RequestSchemaValidationError)
async def invalid_body(error: RequestSchemaValidationError) -> Response:
    cause = error.validation_error
    if hasattr(cause, "errors"):
        # Without the context and input: a validator's ValueError object is
        # not JSON, and the input may be large.
        details = cause.errors(include_url=False, include_context=False, include_input=False)
        return json_response({"error": "The request body is not valid.", "errors": details}, 422)
    return json_response({"error": f"The request body is not valid: {cause}"}, 422)


@api.errorhandler(HTTPException)
async def http_error(error: HTTPException) -> Response:
    # Malformed JSON, a wrong method, a missing user...: JSON, not an HTML page.
    return json_response({"error": error.description or error.name}, error.code or 500)
