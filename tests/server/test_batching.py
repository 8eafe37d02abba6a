"""Batching: concurrent users' requests share forwards and decode steps, and each gets exactly
what it gets alone.

Two servers on the demo model: one batching (a 300 ms gathering window, so that the concurrent
requests of a test really meet), one with --max_batch_requests 1 (every request alone). Nine
users, started together behind a barrier, each send one kind of request to both: cache-only
runs, every op kind with head and position selectors, patching from a stored cache, a Python
hook, stop_at_layer, a loss, and generations with steering, with sampling and with a Python
hook. Results must
agree within 1e-5; the batch-size histogram shows the forwards were shared.
"""
import os
import sys
import threading

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "client"))

import remotelens  # noqa: E402
from remotelens import ops  # noqa: E402
from remotelens.v1 import remotelens_pb2 as pb  # noqa: E402
import server_harness  # noqa: E402
from server_helpers import metric, rpc_error  # noqa: E402
import wire  # noqa: E402

TOL = 1e-5


N_USERS = 12


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    """Users user0.. with keys key0..: each workload is its own user, as in a lab."""
    import hashlib
    path = tmp_path_factory.mktemp("batching_users") / "users.textproto"
    path.write_text("".join(
        f'users {{ name: "user{i}" api_key_sha256: "{hashlib.sha256(f"key{i}".encode()).hexdigest()}" }}\n'
        for i in range(N_USERS)))
    return path


@pytest.fixture(scope="module")
def batching_server(demo_model_dir, users_file):
    server = server_harness.ServerProcess(
        demo_model_dir, config=f'users_file: "{users_file}"\n'
                               "scheduler { max_batch_requests: 16 batch_wait_us: 300000 }\n"
                               "limits { hook_timeout_ms: 2000 }").start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


@pytest.fixture(scope="module")
def alone_server(demo_model_dir, users_file):
    server = server_harness.ServerProcess(demo_model_dir, config=f'users_file: "{users_file}"',
                                          args=["--max_batch_requests=1"]).start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


def close(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            close(a[k], b[k], f"{what}[{k}]")
        return
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype in (torch.int64, torch.int32):
        assert torch.equal(a, b), what
        return
    both_inf = torch.isinf(a) & (a == b)
    diff = torch.where(both_inf, torch.zeros_like(a), (a.float() - b.float()).abs())
    assert diff.max().item() <= TOL, f"{what}: max difference {diff.max().item()}"


def tokens(seed, rows, pos):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (rows, pos), generator=g)


# Each workload: model -> {name: tensor}. Run once per server, concurrently with the others.
def cache_only(m):
    logits, cache = m.run_with_cache(tokens(1, 1, 5))
    return {"logits": logits, **{k: v for k, v in cache.items()}}


def every_op(m):
    d = m.cfg.d_model
    hooks = [("blocks.0.attn.hook_z", ops.zero(head=1)),
             ("blocks.0.hook_mlp_out", ops.scale(0.5, pos=[0, -1])),
             ("blocks.1.hook_resid_pre", ops.set(torch.ones(d), pos=2)),
             ("blocks.1.attn.hook_pattern", ops.mean(head=[0, 2])),
             ("blocks.1.hook_resid_mid", ops.add(torch.linspace(-1, 1, d), scale_by="token_norm")),
             ("blocks.2.hook_attn_out", ops.copy_row(1, pos=-1))]
    with m.hooks(fwd_hooks=hooks):
        logits, cache = m.run_with_cache(tokens(2, 2, 9), names_filter=lambda n: "resid_post" in n)
    return {"logits": logits, **{k: v for k, v in cache.items()}}


def patching(m):
    clean = tokens(3, 1, 7)
    _, cache = m.run_with_cache(clean, names_filter="blocks.1.hook_resid_post", store=True)
    logits = m.run_with_hooks(tokens(4, 1, 7), fwd_hooks=[
        ("blocks.1.hook_resid_post", ops.patch_from(cache, pos=[3, 4]))])
    return {"logits": logits}


def python_hook(m):
    shapes = []

    def halve(pattern, hook):
        shapes.append(tuple(pattern.shape))
        return pattern * 0.5

    logits = m.run_with_hooks(tokens(5, 2, 4), fwd_hooks=[("blocks.0.attn.hook_pattern", halve)])
    return {"logits": logits, "shape": torch.tensor(shapes[0])}


def stop_early(m):
    resid = m(tokens(6, 1, 11), stop_at_layer=2)
    return {"resid": resid}


def loss_and_lens(m):
    loss = m(tokens(7, 3, 6), return_type="loss", loss_per_token=True)
    return {"loss": loss}


def steered_generation(m):
    vector = torch.linspace(-2, 2, m.cfg.d_model)
    with m.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ops.add(vector))]):
        out = m.generate(tokens(8, 1, 4), max_new_tokens=12, do_sample=False, stop_at_eos=False,
                         verbose=False)
    return {"tokens": out}


def sampled_generation(m):
    out = m.generate(tokens(9, 2, 6), max_new_tokens=10, do_sample=True, temperature=0.7, top_k=40,
                     seed=1234, stop_at_eos=False, verbose=False)
    return {"tokens": out}


def python_hook_generation(m):
    """A Python hook in a generation: called back at every decode step it shares."""
    seen = []

    def damp(z, hook):
        seen.append(z.shape[1])
        return z * 0.9

    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_z", damp)]):
        out = m.generate(tokens(14, 1, 5), max_new_tokens=6, do_sample=False, stop_at_eos=False,
                         verbose=False)
    return {"tokens": out, "positions_seen": torch.tensor(seen)}


WORKLOADS = [cache_only, every_op, patching, python_hook, stop_early, loss_and_lens,
             steered_generation, sampled_generation, python_hook_generation]


def run_concurrently(address, workloads):
    models = [remotelens.HookedTransformer.from_server(address, api_key=f"key{i}")
              for i in range(len(workloads))]
    barrier = threading.Barrier(len(workloads))
    results, errors = [None] * len(workloads), [None] * len(workloads)

    def user(i):
        try:
            barrier.wait()
            results[i] = workloads[i](models[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors[i] = e

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(workloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for m in models:
        m.close()
    return results, errors


def shared_forwards(server):
    """Forwards that served more than one request so far."""
    total = metric(server, "remotelens_batch_requests_count") or 0
    alone = metric(server, "remotelens_batch_requests_bucket", {"le": "1"}) or 0
    return total - alone


def test_batched_results_equal_each_request_alone(batching_server, alone_server):
    before = shared_forwards(batching_server)
    batched, errors = run_concurrently(batching_server.address, WORKLOADS)
    assert errors == [None] * len(WORKLOADS), errors
    alone, errors = run_concurrently(alone_server.address, WORKLOADS)
    assert errors == [None] * len(WORKLOADS), errors
    for workload, got, want in zip(WORKLOADS, batched, alone):
        close(got, want, workload.__name__)
    # A Python hook sees its own rows only: the shape it would see alone.
    rows, _, queries, keys = batched[3]["shape"].tolist()
    assert (rows, queries, keys) == (2, 4, 4)
    # In a shared decode step too: the prompt first, then its own new position only.
    assert batched[8]["positions_seen"].tolist() == [5, 1, 1, 1, 1, 1]
    # The forwards really were shared, and the unbatched server never shared one.
    assert shared_forwards(batching_server) - before >= 2
    assert shared_forwards(alone_server) == 0
    assert metric(batching_server, "remotelens_batch_tokens_count") > 0


def test_a_failing_request_leaves_its_batch_mates_correct(batching_server, alone_server):
    def bad_value(m):
        # A value that broadcasts to no region: found only when the forward reaches the hook.
        return m.run_with_hooks(tokens(10, 1, 5), fwd_hooks=[
            ("blocks.0.hook_resid_post", ops.add(torch.ones(3)))])

    def raising_hook(m):
        def boom(x, hook):
            raise RuntimeError("user code failed")
        return m.run_with_hooks(tokens(11, 1, 5), fwd_hooks=[("blocks.1.hook_mlp_out", boom)])

    workloads = [cache_only, bad_value, every_op, raising_hook, steered_generation]
    got, errors = run_concurrently(batching_server.address, workloads)
    assert errors[0] is None and errors[2] is None and errors[4] is None, errors
    assert errors[1] is not None and "does not broadcast" in str(errors[1]), errors[1]
    assert errors[3] is not None and "user code failed" in str(errors[3]), errors[3]
    want, _ = run_concurrently(alone_server.address, [cache_only, every_op, steered_generation])
    close(got[0], want[0], "cache_only")
    close(got[2], want[1], "every_op")
    close(got[4], want[2], "steered_generation")


def test_a_client_that_does_not_answer_fails_only_its_own_request(batching_server, alone_server):
    """hook_timeout_ms (2 s on this server): a Python hook that outlives it ends its request with
    DEADLINE_EXCEEDED; the requests sharing its forward, Python hooks included, finish correctly."""
    import time

    def silent(m):
        def sleep(x, hook):
            time.sleep(4)
        return m.run_with_hooks(tokens(15, 1, 5), fwd_hooks=[("blocks.0.attn.hook_pattern", sleep)])

    got, errors = run_concurrently(batching_server.address, [silent, cache_only, python_hook])
    assert isinstance(errors[0], remotelens.DeadlineExceededError), errors[0]
    assert "hook_timeout_ms" in str(errors[0]), errors[0]
    assert errors[1:] == [None, None], errors
    want, _ = run_concurrently(alone_server.address, [cache_only, python_hook])
    close(got[1], want[0], "cache_only")
    close(got[2], want[1], "python_hook")


def test_users_ops_never_touch_another_users_rows(batching_server):
    """Two users in one forward: one zeroes everything at every residual hook, the other adds
    nothing. The second user's activations equal a plain run's."""
    def wrecker(m):
        return m.run_with_hooks(tokens(12, 2, 6), fwd_hooks=[
            (lambda n: "hook_resid" in n, ops.zero())])

    def plain(m):
        _, cache = m.run_with_cache(tokens(13, 1, 6), names_filter=lambda n: "hook_resid" in n)
        return dict(cache.items())

    (_, together), errors = run_concurrently(batching_server.address, [wrecker, plain])
    assert errors == [None, None]
    (alone,), _ = run_concurrently(batching_server.address, [plain])
    close(together, alone, "plain user's residual stream")
    assert all(v.abs().sum() > 0 for v in together.values())


ADMIN_KEY, USER_KEY = "admin-key-for-jobs", "user-key-for-jobs"


@pytest.fixture(scope="module")
def admin_server(demo_model_dir, tmp_path_factory):
    import hashlib
    d = tmp_path_factory.mktemp("jobs_users")
    path = d / "users.textproto"
    path.write_text(
        f'users {{ name: "root" role: "admin" api_key_sha256: "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}" }}\n'
        f'users {{ name: "alice" api_key_sha256: "{hashlib.sha256(USER_KEY.encode()).hexdigest()}" }}\n')
    server = server_harness.ServerProcess(
        demo_model_dir, config=f'users_file: "{path}"\nscheduler {{ max_batch_requests: 1 }}').start()
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines)


def test_admin_lists_and_cancels_jobs_and_others_are_refused(admin_server):
    channel = admin_server.channel()
    stub = admin_server.stub(channel)
    admin, user = wire.bearer(ADMIN_KEY), wire.bearer(USER_KEY)
    # A long generation: running until an admin cancels it.
    gen = pb.GenerateRequest(tokens=wire.tokens([[1, 2, 3]]), max_new_tokens=200,
                             sampling=pb.SamplingParams(do_sample=False))
    stream = stub.Generate(gen, metadata=user, timeout=120)
    first = next(iter(stream))  # the generation has started
    assert first.HasField("step")
    jobs = stub.ListJobs(pb.ListJobsRequest(), metadata=admin).jobs
    running = [j for j in jobs if j.state == "running" and j.kind == "generate"]
    assert running and running[0].user == "alice" and running[0].tokens == 3
    assert running[0].age_seconds >= 0
    # Not for users.
    for call, request in ((stub.ListJobs, pb.ListJobsRequest()),
                          (stub.CancelJob, pb.CancelJobRequest(job_id=running[0].job_id))):
        code, details = rpc_error(lambda: call(request, metadata=user))
        assert code.name == "PERMISSION_DENIED" and "admin" in details
    stub.CancelJob(pb.CancelJobRequest(job_id=running[0].job_id), metadata=admin)
    with pytest.raises(Exception) as e:
        for _ in stream:
            pass
    assert e.value.code().name == "CANCELLED" and "admin" in e.value.details()
    code, _ = rpc_error(lambda: stub.CancelJob(pb.CancelJobRequest(job_id=987654), metadata=admin))
    assert code.name == "NOT_FOUND"
    assert [j for j in stub.ListJobs(pb.ListJobsRequest(), metadata=admin).jobs
                               if j.job_id == running[0].job_id] == []
    channel.close()
