"""WHIP push (--whip-push): one voice-relay (the origin) publishes each stream
to another voice-relay's WHIP ingest (the edge). aiortc clients send on the
origin and receive on the edge; the edge is down, refuses, or is killed, and
the origin retries with bounded backoff without disturbing its own receivers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Iterator

import pytest

from clients import Clients, Signal, assert_tone, run
from conftest import _finish
from relay_server import RelayServer
from test_limits import scrape


def push_args(edge: RelayServer, *extra: str) -> list[str]:
    return ["--whip-push", f"{edge.http}/whip/{{id}}", *extra]


@contextlib.contextmanager
def servers(*srvs: RelayServer) -> Iterator[None]:
    """Stops the given servers (each held to a clean exit) at the end; on a
    failure their log tails are in the message."""
    try:
        yield
    except BaseException as e:
        tails = "\n".join(s.log_tail(40) for s in srvs)
        raise AssertionError(f"{e}\n{tails}") from e
    finally:
        for s in srvs:
            if s.proc is not None:  # started at least once
                _finish(s)


@contextlib.contextmanager
def origin_and_edge(
    tmp_path: Path, edge_args: tuple[str, ...] = (), origin_args: tuple[str, ...] = (), edge_up: bool = True
) -> Iterator[tuple[RelayServer, RelayServer]]:
    """An origin pushing to an edge (started unless ``edge_up`` is false)."""
    edge = RelayServer(tmp_path / "edge.log", list(edge_args))
    origin = RelayServer(tmp_path / "origin.log", push_args(edge, *origin_args))
    if edge_up:
        start(edge)
    start(origin)
    with servers(origin, edge):
        yield origin, edge


def start(srv: RelayServer) -> RelayServer:
    try:
        srv.start()
    except RuntimeError as e:
        pytest.fail(f"server did not start: {e}", pytrace=False)
    return srv


async def available(sig: Signal, stream: str, timeout: float) -> None:
    await sig.expect("stream_available", timeout, where=lambda m: m.get("stream_id") == stream)


async def push_metrics(origin: RelayServer) -> tuple[float, dict[str, float], float]:
    """The origin's attempts, failures by reason, and live pushes."""
    m = await scrape(origin.http)
    failures = {
        labels["reason"]: m.get("voice_relay_whip_push_failures_total", **labels)
        for labels in m.labels_of("voice_relay_whip_push_failures_total")
    }
    return m.get("voice_relay_whip_push_attempts_total"), failures, m.get("voice_relay_whip_push_live")


async def origin_stream(o: Clients, freq: float):  # noqa: ANN201
    """A tone sender on the origin, its stream id, and an origin receiver of it."""
    snd = await o.sender(freq)
    assert snd.stream_id
    local = await o.receiver(snd.stream_id, name="origin-receiver")
    return snd, snd.stream_id, local


async def hears_on_edge(edge: Clients, stream: str, freq: float, timeout: float = 20.0):  # noqa: ANN201
    """An aiortc WebSocket receiver on the edge, once the pushed stream is
    listed there, hearing the origin sender's tone."""
    watcher = await edge.signal("edge-watcher")
    if stream not in (await watcher.request_streams()):
        await available(watcher, stream, timeout)
    rx = await edge.receiver(stream, name="edge-receiver")
    await rx.wait_audio(2.0, timeout=15)
    assert_tone(rx, freq)
    return watcher, rx


def test_origin_pushes_to_an_edge_and_its_end_reaches_edge_clients(tmp_path: Path) -> None:
    with origin_and_edge(tmp_path, edge_args=("--sender-idle-secs", "60")) as (origin, edge):

        async def main() -> None:
            async with Clients(origin.ws, origin.http) as o, Clients(edge.ws, edge.http) as e:
                snd, stream, local = await origin_stream(o, 523.0)
                watcher, rx = await hears_on_edge(e, stream, 523.0)
                await local.wait_audio(2.0, timeout=10)
                assert_tone(local, 523.0)
                _, failures, live = await push_metrics(origin)
                assert live == 1, (live, failures)
                h = await e.health()
                assert h["active_streams"] == [stream] and h["senders"] == 1, h
                # The sender stops: the origin closes its leg (DTLS close)
                # and DELETEs its session, and the edge's clients hear
                # stream_ended (long before the edge's 60 s idle timeout).
                await snd.stop_stream()
                await watcher.expect("stream_ended", 10, where=lambda m: m.get("stream_id") == stream)
                await rx.wait_ended(10)
                assert "WHIP push session DELETE answered" in origin.log_text()
                await e.wait_health(lambda h: h["active_streams"] == [], 5, "edge idle")
                _, _, live = await push_metrics(origin)
                assert live == 0

        run(main(), 90)


def test_edge_down_at_start_is_retried_with_backoff_until_it_comes_up(tmp_path: Path) -> None:
    with origin_and_edge(tmp_path, edge_up=False) as (origin, edge):

        async def main() -> None:
            async with Clients(origin.ws, origin.http) as o:
                snd, stream, local = await origin_stream(o, 440.0)
                window = 6.0
                t0 = time.monotonic()
                await local.sink.wait_more(window, timeout=window + 10)
                elapsed = time.monotonic() - t0
                attempts, failures, live = await push_metrics(origin)
                # Retried, but with backoff: a tight loop would make
                # thousands of attempts in this window; 1 s doubling makes
                # at most 1 + log2(window) + 1.
                assert failures.get("unreachable", 0) >= 2, failures
                assert 2 <= attempts <= 6, f"{attempts} attempts in {elapsed:.1f}s: {failures}"
                assert live == 0
                assert "WHIP push failed; retrying" in origin.log_text()
                # The origin's own receiver heard the tone all along.
                assert_tone(local, 440.0)

                start(edge)
                async with Clients(edge.ws, edge.http) as e:
                    await hears_on_edge(e, stream, 440.0, timeout=40)
                    attempts_after, _, live = await push_metrics(origin)
                    assert live == 1 and attempts_after <= attempts + 3, (attempts, attempts_after)

        run(main(), 120)


def test_a_refusing_edge_is_counted_by_status_and_the_token_is_not_logged(tmp_path: Path) -> None:
    token_file = tmp_path / "push-token"
    token_file.write_text("wrong-s3cret\n")
    with origin_and_edge(
        tmp_path,
        edge_args=("--send-token", "right-s3cret"),
        origin_args=("--whip-push-token-file", str(token_file)),
    ) as (origin, edge):

        async def main() -> None:
            async with Clients(origin.ws, origin.http) as o, Clients(edge.ws, edge.http) as e:
                watcher = await e.signal("edge-watcher")
                snd = await o.sender(440.0)
                await asyncio.sleep(5.0)
                attempts, failures, live = await push_metrics(origin)
                assert failures.get("http_401", 0) >= 2, failures
                assert attempts <= 6, f"{attempts} attempts in 5 s"
                assert live == 0
                assert watcher.count("stream_available") == 0, watcher.summary()
                assert snd.stream_id in origin.log_text()
                for log in (origin.log_text(), edge.log_text()):
                    assert "wrong-s3cret" not in log
                assert "refused with HTTP 401" in origin.log_text()

        run(main(), 60)


def test_edge_killed_mid_stream_leaves_origin_receivers_alone_and_is_pushed_again(tmp_path: Path) -> None:
    with origin_and_edge(tmp_path) as (origin, edge):

        async def main() -> None:
            async with Clients(origin.ws, origin.http) as o:
                snd, stream, local = await origin_stream(o, 659.0)
                async with Clients(edge.ws, edge.http) as e:
                    await hears_on_edge(e, stream, 659.0)
                    edge.kill()
                # ICE consent fails on the origin's push leg; its own
                # receiver goes on hearing the tone meanwhile.
                frames = local.frames
                await local.sink.wait_more(8.0, timeout=20)
                assert_tone(local, 659.0)
                assert local.frames > frames
                _, failures, _ = await push_metrics(origin)
                edge.start()
                async with Clients(edge.ws, edge.http) as e:
                    await hears_on_edge(e, stream, 659.0, timeout=45)
                _, failures_after, live = await push_metrics(origin)
                assert live == 1, failures_after
                assert sum(failures_after.values()) >= 1, failures_after
                assert_tone(local, 659.0)
                h = await o.health()
                assert h["active_streams"] == [stream] and h["receivers"] == 1, h

        run(main(), 150)


def test_two_streams_are_pushed_to_one_edge_at_once_and_each_ends_there(tmp_path: Path) -> None:
    with origin_and_edge(tmp_path, edge_args=("--sender-idle-secs", "60")) as (origin, edge):

        async def main() -> None:
            async with Clients(origin.ws, origin.http) as o, Clients(edge.ws, edge.http) as e:
                first = await o.sender(440.0)
                second = await o.sender(660.0)
                # Each push leg has its own socket on the origin: the edge
                # tells the two legs apart by their source addresses.
                w1, rx1 = await hears_on_edge(e, first.stream_id, 440.0)
                w2, rx2 = await hears_on_edge(e, second.stream_id, 660.0)
                _, failures, live = await push_metrics(origin)
                assert live == 2, (live, failures)
                h = await e.health()
                assert sorted(h["active_streams"]) == sorted([first.stream_id, second.stream_id]), h
                # Both keep their own tone while the other plays.
                await rx1.sink.wait_more(1.0)
                await rx2.sink.wait_more(1.0)
                assert_tone(rx1, 440.0)
                assert_tone(rx2, 660.0)
                # The first ends on the origin, then on the edge; the
                # second goes on there.
                await first.stop_stream()
                await w1.expect("stream_ended", 10, where=lambda m: m.get("stream_id") == first.stream_id)
                await rx1.wait_ended(10)
                await e.wait_health(lambda h: h["active_streams"] == [second.stream_id], 5, "first gone")
                frames = rx2.frames
                await rx2.sink.wait_more(1.0)
                assert rx2.frames > frames
                assert_tone(rx2, 660.0)
                await second.stop_stream()
                await w2.expect("stream_ended", 10, where=lambda m: m.get("stream_id") == second.stream_id)
                await rx2.wait_ended(10)
                await e.wait_health(lambda h: h["active_streams"] == [], 5, "edge idle")
                _, failures, live = await push_metrics(origin)
                assert live == 0, failures

        run(main(), 120)
