"""Imported first by each rank's DataLoader fork server (:data:`masan.data.workers.WORKER_IMPORTS`):
the server ends with the rank that started it.

A fork server is an exec'd child of its rank that notices the rank's end only through a pipe
that every worker forked from it also holds: a rank that ended without closing its loaders
(kill -9, a second Ctrl-C, a node's OOM killer) left the server and its workers alive for good,
each worker holding its prefetched batches in shared memory, more with every such end. Linux's
``PR_SET_PDEATHSIG`` kills the server with its rank; the workers, whose parent is the server,
then end by torch's own watchdog (it checks their parent). Linux ties the signal to the rank's
thread that started the server, so only a server started from the main thread is tied.

Importing this module anywhere else does nothing: it acts only in a process whose parent is
the pid that :func:`mark_parent` wrote into :data:`PARENT_ENV`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

PARENT_ENV = "MASAN_FORKSERVER_PARENT"
"""The pid of the rank that starts the fork server (inherited by the server through its environment)."""
_PR_SET_PDEATHSIG = 1


def mark_parent() -> None:
    """In a rank, before its first loader starts the fork server: name this process its parent.
    From another thread than the main one it unnames it: the signal would come when that thread
    ends, and take the server from the loaders that come after."""
    if threading.current_thread() is threading.main_thread():
        os.environ[PARENT_ENV] = str(os.getpid())
    else:
        os.environ.pop(PARENT_ENV, None)


def _die_with_parent() -> None:
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or os.getppid() != int(parent):
        return  # not a fork server this module's rank started
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the server lives as before
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the rank ended before the call: nobody would signal this server
        os._exit(1)


_die_with_parent()
