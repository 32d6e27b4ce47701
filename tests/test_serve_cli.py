"""`loraforge serve` flags (the server itself is tested in test_serve_server.py)."""

from __future__ import annotations

import argparse

import pytest

from loraforge.serve.cli import _is_loopback, add_parser, cmd_serve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loraforge")
    add_parser(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


def test_serve_flags_default_to_loopback_and_the_embedded_model():
    args = parse(["serve", "--adapters", "ads", "--max-loaded", "4", "--api-key", "k"])
    assert (args.model, args.host, args.adapters, args.max_loaded, args.api_key) == ("smollm2-135m", "127.0.0.1", "ads", 4, "k")
    assert args.run is cmd_serve


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("10.0.0.5", False)])
def test_loopback_detection(host, loopback):
    assert _is_loopback(host) is loopback
