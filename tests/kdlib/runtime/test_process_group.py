"""kdlib/runtime/process_group.py: naming the rank and host behind a connection a collective lost."""

from kdlib.runtime import process_group


def test_a_broken_connection_names_the_rank_and_host_behind_the_address(monkeypatch):
    monkeypatch.setattr(process_group, "_peers", {"10.213.7.12": (1, "kdnode2"), "10.213.7.11": (0, "kdnode1")})
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.213.7.12]:15587: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert process_group.lost_peer(gloo) == "rank 1 on host kdnode2 (10.213.7.12)"
    closed = RuntimeError("[pair.cc:598] Connection closed by peer [10.9.9.9]:4411")
    assert process_group.lost_peer(closed) == "the rank at 10.9.9.9"  # an address no rank reported
    assert process_group.lost_peer(RuntimeError("CUDA out of memory [10.213.7.12]:1")) is None  # not a lost link
    assert process_group.lost_peer(ValueError("shapes differ")) is None
