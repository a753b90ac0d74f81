"""The worker's consumer: every message it takes in runs as a task or becomes a dead letter.

Celery's consumer hands a message to its task's strategy, which takes the message for
a task message: a body that is not ``[args, kwargs, embed]``, or headers without a task
id, raised there and stopped the worker, which gave the message back to the queue as it
exited and met it again at its next start; refused content types and unknown tasks were
logged and dropped. Here each message is looked at first (``fault``), in the order a
reader would: was it readable at all (workers.compat marks the list items kombu could
not read), how large is its body, does it decode, is it a task message of protocol 2
(the only one this system sends), does it name a task this worker has, can that task
take its arguments. A message at fault is kept as a dead letter of that kind, with its
bytes, and acknowledged: the worker takes the next one. Should the letter itself fail
to be written (the database down), the message is logged in full and acknowledged all
the same: nothing poison waits in a queue for the database.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from kombu.utils.json import dumps

from workers import dlq
from workers.base import briefly_retried
from workers.compat import UNREADABLE, UNREADABLE_REASON

logger = logging.getLogger(__name__)

#: Task parameters that carry ids the tasks parse with ``UUID()``: a message with any
#: other string there fails in the task (a saga step would first abort its step).
UUID_PARAMETERS = frozenset({"saga_id", "run_id"})
#: The parts of a body's ``embed`` that are lists, and the one that is an object.
EMBED_LISTS = ("callbacks", "errbacks", "chain")
EMBED_OBJECTS = ("chord",)


@dataclass(frozen=True)
class Fault:
    """Why a message cannot run: the kind of its dead letter, and what is wrong."""

    kind: str
    error: str
    #: The arguments, when the message is a task message (shown to operators).
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskCall:
    """What a well-formed task message asks for."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]


#: How the consumer retries a lost broker: first after this many seconds, each wait this
#: much longer, never longer than the cap (Celery's own: 2 s, +2 s, 30 s). A Redis
#: failover promotes the replica in a few seconds; Celery's waits would add up to 10 s
#: more before a worker takes messages again (docs/reliability.md).
RECONNECT_FIRST_SECONDS, RECONNECT_STEP_SECONDS, RECONNECT_MAX_SECONDS = 0.5, 0.5, 5.0


class DeadLetteringConsumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, keeping every message it cannot run as a dead letter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signatures: dict[str, inspect.Signature | None] = {}

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's reconnection, with shorter waits between tries (see above)."""
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_FIRST_SECONDS,
            interval_step=RECONNECT_STEP_SECONDS,
            interval_max=RECONNECT_MAX_SECONDS,
        )
        return super().ensure_connected(conn)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's handler of task messages, given only messages it can run."""
        run = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            try:
                fault = self.fault(message)
            except Exception as exc:  # a check that failed is a message we cannot read
                fault = Fault(dlq.UNPROCESSABLE, _describe(exc))
            if fault is None:
                try:
                    return run(message)
                except (*self.connection_errors, *self.channel_errors):
                    raise  # the connection's fault, not the message's: Celery reconnects
                except Exception as exc:
                    if message.acknowledged:  # Celery dealt with it, then failed
                        logger.exception("after taking in %r", message)
                        return None
                    fault = Fault(dlq.UNPROCESSABLE, _describe(exc))
            self._dead_letter(message, fault)
            return None

        return on_task_received

    def fault(self, message: Any) -> Fault | None:
        """What keeps ``message`` from running as a task, if anything."""
        headers = message.headers
        if isinstance(headers, dict) and UNREADABLE in headers:
            return Fault(str(headers[UNREADABLE]), str(headers.get(UNREADABLE_REASON)))
        if not isinstance(headers, dict):
            return Fault(dlq.NOT_AN_ENVELOPE, "the headers are not an object")
        size = len(message.body or b"")
        limit = self.app.orders_runtime.settings.max_message_bytes
        if size > limit:
            return Fault(dlq.TOO_LARGE, f"a body of {size} bytes, over MAX_MESSAGE_BYTES={limit}")
        try:
            payload = message.decode()
        except ContentDisallowed as exc:
            return Fault(dlq.REFUSED_CONTENT_TYPE, _describe(exc))
        except Exception as exc:
            return Fault(dlq.UNDECODABLE, _describe(exc))
        call = task_call(headers, payload)
        if isinstance(call, Fault):
            return call
        task = self.app.tasks.get(call.name)
        if task is None:
            return None  # Celery's on_unknown_task (below) keeps it
        return self._argument_fault(task, call)

    def _argument_fault(self, task: Any, call: TaskCall) -> Fault | None:
        signature = self._signature(task)
        if signature is None:
            return None
        problem = None
        try:
            bound = signature.bind(*call.args, **call.kwargs)
        except TypeError as exc:
            problem = str(exc)
        else:
            for name, value in bound.arguments.items():
                parameter = signature.parameters[name]
                if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    continue
                if not fits(value, parameter.annotation):
                    problem = f"{name}={value!r:.200} is not {_type_name(parameter.annotation)}"
                elif name in UUID_PARAMETERS and not _is_uuid(value):
                    problem = f"{name}={value!r:.200} is not a UUID"
                if problem:
                    break
        if problem is None:
            return None
        return Fault(dlq.BAD_ARGUMENTS, f"{call.name}: {problem}", call.args, call.kwargs)

    def _signature(self, task: Any) -> inspect.Signature | None:
        """The task's parameters, their annotations evaluated (once per task)."""
        if task.name not in self._signatures:
            try:
                signature = inspect.signature(task.run, eval_str=True)
            except NameError:  # an annotation that cannot be evaluated: not checked
                signature = inspect.signature(task.run)
            except (TypeError, ValueError):
                signature = None
            self._signatures[task.name] = signature
        return self._signatures[task.name]

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message kombu could not decode (a refused serializer, a broken body)."""
        kind = dlq.REFUSED_CONTENT_TYPE if isinstance(exc, ContentDisallowed) else dlq.UNDECODABLE
        self._dead_letter(message, Fault(kind, _describe(exc)))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message that is not a task message at all (Celery then drops it)."""
        self._keep(message, Fault(dlq.MALFORMED_HEADERS, "no task named in the message"))
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A message naming a task no worker registers (Celery then drops it)."""
        fault = Fault(dlq.UNKNOWN_TASK, f"no task {exc} is registered here")
        try:
            call = task_call(message.headers, message.decode())  # it passed ``fault``
        except Exception:
            call = None
        if isinstance(call, TaskCall):
            fault = Fault(
                fault.kind, f"no task {call.name!r} is registered here", call.args, call.kwargs
            )
        self._keep(message, fault)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A message Celery found invalid (an unreadable ETA or expiry; Celery drops it)."""
        if isinstance(exc, ContentDisallowed):
            kind = dlq.REFUSED_CONTENT_TYPE
        elif isinstance(exc, InvalidTaskError):
            kind = dlq.MALFORMED_HEADERS
        else:
            kind = dlq.UNPROCESSABLE
        self._keep(message, Fault(kind, _describe(exc)))
        super().on_invalid_task(body, message, exc)

    def _dead_letter(self, message: Any, fault: Fault) -> None:
        """Keep the message as a dead letter, then acknowledge it."""
        self._keep(message, fault)
        if not message.acknowledged:
            message.ack_log_error(logger, self.connection_errors)

    def _keep(self, message: Any, fault: Fault) -> None:
        """Write the message's dead letter; if even that fails, log everything about it
        (nothing disappears silently)."""
        letter: dict[str, Any] = {"kind": fault.kind, "error": fault.error}
        try:
            headers = message.headers if isinstance(message.headers, dict) else {}
            task_id, task_name = headers.get("id"), headers.get("task")
            letter |= {
                # A message read again (its worker died before acknowledging it) updates
                # its letter: its task id, or else its delivery tag, names it.
                "task_id": task_id
                if isinstance(task_id, str) and task_id
                else f"undelivered-{message.delivery_tag}",
                "task_name": task_name if isinstance(task_name, str) else f"({fault.kind})",
                "args": fault.args,
                "kwargs": fault.kwargs,
                "queue": (message.delivery_info or {}).get("routing_key"),
                "raw": raw_text(message),
            }
            engine = self.app.orders_runtime.engine
            briefly_retried(lambda: dlq.record(engine, **letter))
        except Exception:
            shown = {**letter, "raw": str(letter.get("raw"))[: dlq.KEEP_CHARS]}
            logger.exception("could not keep a dead letter: %r", shown)
            return
        logger.error(
            "%s[%s] dead-lettered (%s): %s",
            letter["task_name"],
            letter["task_id"],
            fault.kind,
            fault.error,
        )


def task_call(headers: dict[str, Any], payload: Any) -> TaskCall | Fault:
    """The task, arguments and keyword arguments of a protocol 2 task message, or what
    keeps the message from being one."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        shape = f"a list of {len(payload)}" if isinstance(payload, list | tuple) else "not a list"
        return Fault(dlq.MALFORMED_BODY, f"the body is not [args, kwargs, embed]: {shape}")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return Fault(dlq.MALFORMED_BODY, "the body's args are not a list")
    if not isinstance(kwargs, dict):
        return Fault(dlq.MALFORMED_BODY, "the body's kwargs are not an object")
    if embed is not None and not isinstance(embed, dict):
        return Fault(dlq.MALFORMED_BODY, "the body's embed is not an object")
    for key in EMBED_LISTS + EMBED_OBJECTS:
        value = (embed or {}).get(key)
        wanted = list if key in EMBED_LISTS else dict
        if value is not None and not isinstance(value, wanted):
            return Fault(dlq.MALFORMED_BODY, f"the body's embed {key} is not {_type_name(wanted)}")
    header_fault = _header_fault(headers)
    if header_fault is not None:
        return Fault(dlq.MALFORMED_HEADERS, header_fault)
    return TaskCall(headers["task"], list(args), kwargs)


def _header_fault(headers: dict[str, Any]) -> str | None:
    """What is wrong with the headers Celery's worker reads before a task runs."""
    for key in ("task", "id"):
        if not isinstance(headers.get(key), str) or not headers[key]:
            return f"no task {'name' if key == 'task' else key} in the headers"
    if headers.get("shadow") is not None and not isinstance(headers["shadow"], str):
        return "the shadow name is not a string"
    if headers.get("retries") is not None and not _is_int(headers["retries"]):
        return "the retry count is not an integer"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(limit is None or _is_number(limit) for limit in limits)
    ):
        return "the time limit is not [hard, soft] in seconds"
    return None


def fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a parameter's annotation (as far as JSON can say:
    the outer type of a generic; annotations it cannot judge always fit)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, member) for member in typing.get_args(annotation))
    kind = origin or annotation
    if not isinstance(kind, type):
        return True  # a string, a Literal, a TypeVar: not judged
    if kind is UUID:
        return _is_uuid(value)
    if kind is float:
        return _is_number(value)
    if kind is int:
        return _is_int(value)
    if kind is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, kind)


def raw_text(message: Any) -> str:
    """The message as it lay on the list, as text (bytes that are not UTF-8 escaped)."""
    headers = message.headers
    if not (isinstance(headers, dict) and UNREADABLE in headers):
        envelope = getattr(message, "_raw", None)  # kombu's virtual transports keep it
        if envelope is not None:
            try:
                return str(dumps(envelope))  # as kombu's Redis transport writes it
            except Exception:
                logger.debug("the envelope does not serialize again", exc_info=True)
    body = message.body
    if isinstance(body, bytes):
        return body.decode("utf-8", "backslashreplace")
    return "" if body is None else str(body)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        UUID(value)
    except ValueError:
        return False
    return True
