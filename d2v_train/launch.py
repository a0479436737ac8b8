"""`python -m d2v_train.launch ...`: torchrun, with the stores of a one-machine run on 127.0.0.1.

torch's TCPStore takes no bind address: its server listens on every interface, unauthenticated,
and anyone who reaches the port can join or disturb the rendezvous. For a run on one machine
(`--standalone`, or a rendezvous address on loopback, torchrun's default) nothing outside it
needs the stores, so this launcher makes each store server in torchrun's process listen on
127.0.0.1 alone and points the workers there (`--local-addr`). A run across machines
(`--rdzv-endpoint HOST:PORT` of a reachable host) is left as torchrun makes it: it has to be
reachable, and a private network or firewall is the place to protect it.
Every argument is torchrun's. A SIGTERM ends it with exit 143 (pre-empted), not torchrun's 1.
"""
from __future__ import annotations

import signal
import socket
import sys
from datetime import timedelta

import torch.distributed as dist

LOOPBACK = "127.0.0.1"


class LoopbackTCPStore(dist.TCPStore):
    """A TCPStore whose server listens on 127.0.0.1 only (clients are unchanged)."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 timeout: timedelta = timedelta(seconds=300), wait_for_workers: bool = True,
                 multi_tenant: bool = False, master_listen_fd: int | None = None, use_libuv: bool = True) -> None:
        if is_master and master_listen_fd is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind((LOOPBACK, port))  # port 0: the kernel picks one, read back below
                listener.listen(socket.SOMAXCONN)
            except OSError:
                listener.close()
                raise
            port = listener.getsockname()[1]
            master_listen_fd = listener.detach()  # the store owns the socket from here on
            host_name = LOOPBACK
        super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant,
                         master_listen_fd, use_libuv)


def _use_loopback_stores() -> None:
    """Every store server torchrun's process makes from here on listens on 127.0.0.1."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

    dist.TCPStore = LoopbackTCPStore  # dynamic_rendezvous and elastic.utils look it up at each call
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore  # these two imported the name
    static_tcp_rendezvous.TCPStore = LoopbackTCPStore


def one_machine(args) -> bool:
    """Whether torchrun's parsed arguments describe a run whose every process is on this machine:
    `--standalone`, or a rendezvous address (`--rdzv-endpoint`, else `--master-addr`) on loopback."""
    if args.standalone:
        return True
    return is_loopback(args.rdzv_endpoint.rsplit(":", 1)[0] if args.rdzv_endpoint else args.master_addr)


def is_loopback(host: str | None) -> bool:
    """Whether a rendezvous host names this machine's loopback interface."""
    return host is not None and host.strip("[]") in ("localhost", "127.0.0.1", "::1")


PREEMPTED_EXIT = 143  # 128 + SIGTERM, as the trainer itself exits after its SIGTERM save


def main(argv: list[str] | None = None) -> None:
    """torchrun; a SIGTERM (a scheduler's pre-emption) ends it with exit 143, as it ends the
    trainer's processes once they have saved, instead of torchrun's exit 1, which a scheduler reads
    as a failure."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if one_machine(args):
        if args.local_addr is None:
            args.local_addr = LOOPBACK  # MASTER_ADDR of the workers: the loopback store
        _use_loopback_stores()
    try:
        run(args)
    except SignalException as exc:
        if exc.sigval != signal.SIGTERM:
            raise
        print("d2v_train.launch: SIGTERM: the workers were stopped (the trainer saves a checkpoint first); "
              f"exit {PREEMPTED_EXIT}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    main()
