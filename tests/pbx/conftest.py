"""Fixtures for the PBX layer: simulators on 127.0.0.1 port 0, raw AMI sockets, our driver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mailgw.pbx.driver import AmiClient, AmiPbx
from mailgw.pbx.phones import PhoneBook
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import SCALE, SECRET, USER, RawAmi, pbx_config


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """Start simulators (demo phone book unless given); all are stopped after the test."""
    started: list[AmiSimulator] = []

    async def make(phones: PhoneBook | None = None, port: int = 0, **kwargs: Any) -> AmiSimulator:
        kwargs.setdefault("time_scale", SCALE)
        sim = AmiSimulator(phones=phones, username=USER, secret=SECRET, **kwargs)
        await sim.start("127.0.0.1", port)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: Callable[..., Any]) -> AmiSimulator:
    return await make_sim()


@pytest.fixture
async def raw(sim: AmiSimulator) -> AsyncIterator[RawAmi]:
    client = await RawAmi.open(sim.port)
    yield client
    client.close()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Any]]:
    clients: list[AmiClient] = []

    async def make(port: int, **kwargs: Any) -> AmiClient:
        kwargs.setdefault("reconnect_min", 0.02)
        kwargs.setdefault("reconnect_max", 0.2)
        username = kwargs.pop("username", USER)
        secret = kwargs.pop("secret", SECRET)
        client = AmiClient("127.0.0.1", port, username, secret, **kwargs)
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def make_pbx() -> AsyncIterator[Callable[..., Any]]:
    started: list[AmiPbx] = []

    async def make(sim: AmiSimulator, **kwargs: Any) -> AmiPbx:
        pbx = AmiPbx(pbx_config(sim.port or 0), **kwargs)
        started.append(pbx)
        await pbx.start()
        return pbx

    yield make
    for pbx in started:
        await pbx.stop()
