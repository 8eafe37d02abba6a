"""Server errors arrive as Python exceptions; API keys and TLS through from_server."""
import hashlib
import subprocess
import time

import pytest
import torch

import remotelens
import server_harness
from client_helpers import assert_close

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"


@pytest.fixture(scope="module")
def secure_server(demo_model_dir, tmp_path_factory):
    """A server with API keys (bob's requests are capped at 8 tokens) and TLS on 127.0.0.1."""
    d = tmp_path_factory.mktemp("secure")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    users = d / "users.textproto"
    sha = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    users.write_text(f'users {{ name: "alice" api_key_sha256: "{sha(ALICE)}" }}\n'
                     f'users {{ name: "bob" api_key_sha256: "{sha(BOB)}" '
                     f'quota {{ max_tokens_per_request: 8 }} }}\n')
    config = f'users_file: "{users}"\ntls {{ cert_file: "{cert}" key_file: "{key}" }}\n'
    with server_harness.ServerProcess(demo_model_dir, config=config) as server:
        server.cert = cert
        yield server


def test_tls_and_api_key(secure_server, model):
    with remotelens.HookedTransformer.from_server(secure_server.address, api_key=ALICE,
                                                  root_certificates=secure_server.cert,
                                                  center_unembed=False) as alice:
        tokens = alice.to_tokens("The cat sat")
        assert_close(alice(tokens), model(tokens))
    with open(secure_server.cert, "rb") as f:
        pem = f.read()
    with remotelens.HookedTransformer.from_server(secure_server.address, api_key=BOB,
                                                  root_certificates=pem) as bob:
        assert bob.cfg.n_layers == model.cfg.n_layers


def test_environment_supplies_address_and_key(secure_server, monkeypatch):
    monkeypatch.setenv("REMOTELENS_ADDRESS", secure_server.address)
    monkeypatch.setenv("REMOTELENS_API_KEY", ALICE)
    with remotelens.HookedTransformer.from_server(root_certificates=secure_server.cert) as alice:
        assert alice.address == secure_server.address and alice.session_id


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_bad_or_missing_key_is_unauthenticated(secure_server, monkeypatch, key):
    monkeypatch.delenv("REMOTELENS_API_KEY", raising=False)
    with pytest.raises(remotelens.UnauthenticatedError) as info:
        remotelens.HookedTransformer.from_server(secure_server.address, api_key=key,
                                                 root_certificates=secure_server.cert)
    assert isinstance(info.value, PermissionError) and info.value.details


def test_other_users_cache_is_permission_denied_and_quota_is_resource_exhausted(secure_server):
    kwargs = dict(root_certificates=secure_server.cert)
    with remotelens.HookedTransformer.from_server(secure_server.address, api_key=ALICE, **kwargs) as alice, \
            remotelens.HookedTransformer.from_server(secure_server.address, api_key=BOB, **kwargs) as bob:
        tokens = alice.to_tokens("The cat")
        _, cache = alice.run_with_cache(tokens, names_filter="hook_embed", store=True)
        with pytest.raises(remotelens.PermissionDeniedError) as denied:
            bob._fetch_cache(alice.session_id, cache.handle, ["hook_embed"])
        assert isinstance(denied.value, PermissionError)
        with pytest.raises(remotelens.ResourceExhaustedError, match="max_tokens_per_request") as exhausted:
            bob(torch.zeros(1, 9, dtype=torch.int64))
        assert isinstance(exhausted.value, RuntimeError)
        assert bob(torch.zeros(1, 8, dtype=torch.int64)).shape == (1, 8, bob.cfg.d_vocab)


def test_invalid_argument_and_out_of_range(model):
    with pytest.raises(remotelens.InvalidArgumentError) as bad_token:
        model(torch.tensor([[model.cfg.d_vocab + 5]]))
    assert isinstance(bad_token.value, ValueError)
    too_long = model.to_tokens("the cat " * 400, truncate=False)
    with pytest.raises(remotelens.OutOfRangeError, match="n_ctx") as long_input:
        model(too_long)
    assert isinstance(long_input.value, ValueError)
    with pytest.raises(remotelens.InvalidArgumentError, match="max_new_tokens"):
        model.generate(model.to_tokens("a"), max_new_tokens=0, verbose=False)


def test_deadline_and_unreachable_server(demo_server):
    with remotelens.HookedTransformer.from_server(demo_server.address, timeout=0.5) as hurried:
        tokens = hurried.to_tokens("The cat")
        with pytest.raises(remotelens.DeadlineExceededError) as late:
            hurried.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: time.sleep(0.8))])
        assert isinstance(late.value, TimeoutError)
        assert hurried(tokens).shape[1] == tokens.shape[1]  # later calls get their own deadline
    with pytest.raises(remotelens.UnavailableError) as gone:
        remotelens.HookedTransformer.from_server("127.0.0.1:1", timeout=10)
    assert isinstance(gone.value, ConnectionError)


def test_closed_session_is_not_found(demo_server):
    model = remotelens.HookedTransformer.from_server(demo_server.address)
    tokens = model.to_tokens("The cat")
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed", store=True, download=False)
    session = model.session_id
    model._unary("CloseSession", remotelens.hooked_transformer.pb.CloseSessionRequest(session_id=session))
    with pytest.raises(remotelens.NotFoundError) as missing:
        cache["hook_embed"]
    assert isinstance(missing.value, KeyError) and "session" in str(missing.value).lower()
    model._session_id = None
    model.close()


def test_session_limit_degrades_to_no_stored_caches(demo_model_dir):
    with server_harness.ServerProcess(demo_model_dir, config="limits { max_sessions_per_user: 1 }") as server:
        first = remotelens.HookedTransformer.from_server(server.address)
        with pytest.warns(UserWarning, match="no server session"):
            second = remotelens.HookedTransformer.from_server(server.address)
        tokens = second.to_tokens("The cat")
        assert second(tokens).shape[1] == tokens.shape[1]  # everything but storing works
        with pytest.raises(remotelens.ResourceExhaustedError):
            second.run_with_cache(tokens, names_filter="hook_embed", store=True)
        first.close()
        _, cache = second.run_with_cache(tokens, names_filter="hook_embed", store=True)
        assert cache.handle and cache.session_id == second.session_id
        second.close()
