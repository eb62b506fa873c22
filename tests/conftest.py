"""Shared fixtures: a real MongoDB wire-protocol server (SecantusDB) on 127.0.0.1 for `mongo` tests."""

import pytest

from sharding.world.mongo import HAVE_PYMONGO, HAVE_SECANTUS, MongoTestServer


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    """One server for the session; tests use their own database names."""
    if not (HAVE_PYMONGO and HAVE_SECANTUS):
        pytest.skip("pymongo and SecantusDB are needed (pip install -e '.[test]')")
    with MongoTestServer(tmp_path_factory.mktemp("mongo")) as server:
        yield server
