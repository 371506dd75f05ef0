"""One bounded admission queue for every front end of an engine (web chat, /chat, /v1, remote front ends).

At most `slots` requests are answered at once (their decode steps batched, llava_ui.engine.scheduler); up to
`waiting` more wait their turn in arrival order; beyond that a request is refused at once with ServerBusy (the API
answers 429 with Retry-After, the chat says the server is busy). Each answer holds a KV cache, so this bounds the
memory requests can take, whichever front end they come through.
"""
from __future__ import annotations

import threading
from collections import deque

from llava_ui.errors import UserError

POLL_S = 0.5  # how often a waiting request reports its place and checks its stop event


class ServerBusy(UserError):
    """Every slot is taken and the queue is full: try again later."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, slots: int = 4, waiting: int = 32):
        self.slots, self.waiting = max(1, slots), max(0, waiting)
        self.active = 0
        self._queue: deque = deque()  # tickets of the waiting requests, oldest first
        self._changed = threading.Condition()

    def configure(self, slots: int, waiting: int) -> None:
        with self._changed:
            self.slots, self.waiting = max(1, slots), max(0, waiting)
            self._changed.notify_all()

    def status(self) -> dict:
        with self._changed:
            return {"active": self.active, "waiting": len(self._queue), "slots": self.slots,
                    "queue_size": self.waiting}

    def join(self) -> "Ticket":
        """A place: admitted at once when a slot is free and nobody waits, else in line. Raises ServerBusy when
        the line is full."""
        ticket = Ticket()
        with self._changed:
            if self.active < self.slots and not self._queue:
                self.active += 1
                ticket.admitted = True
            elif len(self._queue) >= self.waiting:
                raise ServerBusy(f"the server is busy: {self.active} answers are being computed and "
                                 f"{len(self._queue)} wait; try again in a moment",
                                 retry_after_s=max(5, 5 * (len(self._queue) + 1) // self.slots))
            else:
                self._queue.append(ticket)
        return ticket

    def wait(self, ticket: "Ticket", timeout: float) -> bool:
        """True once the ticket is admitted (the caller then holds a slot until leave()); False after `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: self._admit(ticket), timeout)
            return ticket.admitted

    def position(self, ticket: "Ticket") -> tuple[int, int]:
        """(place in line, 1 = next; how many wait)."""
        with self._changed:
            return (self._queue.index(ticket) + 1 if ticket in self._queue else 0), len(self._queue)

    def cancel(self, ticket: "Ticket") -> None:
        """Leave the line (a stopped request), or the slot if it was admitted meanwhile."""
        with self._changed:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._changed.notify_all()
                return
        if ticket.admitted:
            self.leave()

    def leave(self) -> None:
        with self._changed:
            self.active -= 1
            self._changed.notify_all()

    def _admit(self, ticket: "Ticket") -> bool:
        if not ticket.admitted and self.active < self.slots and self._queue and self._queue[0] is ticket:
            self._queue.popleft()
            self.active += 1
            ticket.admitted = True
            self._changed.notify_all()
        return ticket.admitted


class Ticket:
    admitted = False
