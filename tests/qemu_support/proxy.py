"""A TCP forwarder a test can cut, to break a migration's connections mid-way."""

from __future__ import annotations

import socket
import threading


class Proxy:
    """A TCP forwarder the test can cut: every connection through it dies at once."""

    def __init__(self, target_port: int, port: int = 0):
        self.target = target_port
        self.lsock = socket.create_server(("127.0.0.1", port))
        self.port = self.lsock.getsockname()[1]
        self.socks: list = []
        self.bytes = 0
        self._cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._cut.is_set():
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                d = a.recv(1 << 16)
                if not d:
                    break
                self.bytes += len(d)
                b.sendall(d)
        except OSError:
            pass
        finally:
            self.cut_one(b)

    @staticmethod
    def cut_one(s):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cut(self):
        self._cut.set()
        self.cut_one(self.lsock)  # wakes the accept() so the port is free at once
        self.lsock.close()
        for s in self.socks:
            self.cut_one(s)
        for s in self.socks:
            s.close()
