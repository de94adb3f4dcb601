"""The control plane's threads: a heartbeat that cannot write stops its rank with the cause."""
import datetime
import time

import pytest
import torch.distributed as dist

from lapdtr.runtime.control import Heartbeat, StoreView


def _server():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def test_heartbeat_writes_telemetry():
    server = _server()
    hb = Heartbeat("127.0.0.1", server.port, "t/", 3, 0.01, lambda: {"hb": 1.5})
    hb.start()
    st = StoreView(server, "t/")
    deadline = time.time() + 5
    while not st.has("tele", 3) and time.time() < deadline:
        time.sleep(0.01)
    hb.stopped.set()
    hb.join(5)
    assert st.get_json("tele", 3) == {"hb": 1.5}
    hb.check()  # no error


def test_a_heartbeat_that_dies_names_the_cause():
    server = _server()

    def telemetry():
        raise OSError("store connection reset")

    hb = Heartbeat("127.0.0.1", server.port, "t/", 2, 0.01, telemetry)
    hb.start()
    hb.join(5)
    assert not hb.is_alive()
    with pytest.raises(RuntimeError, match=r"rank 2: its heartbeat .* failed \(OSError: store "
                                           r"connection reset\)"):
        hb.check()
