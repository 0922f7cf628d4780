"""federated.fast_polling: the latency patch applies on the pinned Flower, is undone afterwards,
and says in one warning line when it cannot apply."""

from __future__ import annotations

import threading
import warnings

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from ted_fl.federated import simulation as S


def test_patch_applies_on_the_pinned_flower_and_is_undone() -> None:
    assert S.polling_patch_problem() == ""
    original = vce_api.add_messages_to_queue
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with S.fast_message_polling(True) as applied:
            assert applied
            assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original


def test_off_by_default_leaves_flower_alone() -> None:
    from ted_fl.config import FederatedConfig

    assert FederatedConfig().fast_polling is False
    original = vce_api.add_messages_to_queue
    with S.fast_message_polling(False) as applied:
        assert not applied and vce_api.add_messages_to_queue is original


def test_patched_handover_moves_a_pushed_message_at_once() -> None:
    """The replacement does what Flower's thread does (state -> queue), woken by a push."""

    class State:
        def __init__(self) -> None:
            self.box: list[str] = []

        def get_message_ins(self, node_id: int, limit: int) -> list[str]:
            out, self.box = self.box[:limit], self.box[limit:]
            return out

    import queue as q

    state, out, stop = State(), q.Queue(), threading.Event()
    with S.fast_message_polling(True):
        t = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, {1: 0}, stop), daemon=True)
        t.start()
        state.box.append("msg")
        S._PUSHED.set()
        assert out.get(timeout=60) == "msg"
        stop.set()
        S._PUSHED.set()
        t.join(timeout=60)


def test_one_warning_line_when_flower_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop, extra):  # a newer Flower's shape
        return None

    monkeypatch.setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)
    with (pytest.warns(RuntimeWarning, match=r"^federated.fast_polling: not applied, .*changed shape") as rec,
          S.fast_message_polling(True) as applied):
        assert not applied
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert "\n" not in str(rec[0].message)
