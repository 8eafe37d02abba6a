"""Server behaviours the client relies on, checked on the raw RPCs.

Each was a server bug found while writing the client (the client first worked around them; the
server has since been fixed): a residual input that ignored attention_mask, stop_at_layer ==
n_layers answering with logits, and start_at_layer == n_layers crashing the process (SIGSEGV).
"""
import time

from remotelens._wire import ChunkAssembler, tensor_to_proto
from remotelens.v1 import remotelens_pb2 as pb
from client_helpers import assert_close
import server_harness


def run_raw(stub, request):
    out, assembler = {}, ChunkAssembler()
    for response in stub.Run(request):
        if response.WhichOneof("item") == "tensor":
            done = assembler.add(response.tensor)
            if done:
                out[done[0]] = done[1]
    return out


def test_residual_input_honours_the_attention_mask(demo_server, model, reference):
    tokens, mask = model._encode(["The cat sat on the mat.", "Hi"], padding_side="left")
    ref_logits, ref_cache = reference.forward(tokens, attention_mask=mask)
    request = pb.RunRequest(residual=tensor_to_proto(ref_cache["blocks.2.hook_resid_pre"]),
                            start_at_layer=2, attention_mask=tensor_to_proto(mask))
    logits = run_raw(demo_server.stub(), request)["logits"]
    real = mask.bool()
    assert_close(logits[real], ref_logits[real])


def test_stop_at_n_layers_returns_the_residual(demo_server, model, reference):
    tokens = model.to_tokens("The cat sat")
    _, ref_cache = reference.forward(tokens)
    n = model.cfg.n_layers
    out = run_raw(demo_server.stub(), pb.RunRequest(tokens=tensor_to_proto(tokens), stop_at_layer=n))
    assert_close(out["logits"], ref_cache[f"blocks.{n - 1}.hook_resid_post"])


def test_start_at_n_layers_runs_only_the_final_norm_and_unembedding(demo_model_dir, model, reference):
    tokens = model.to_tokens("The cat sat")
    ref_logits, ref_cache = reference.forward(tokens)
    n = model.cfg.n_layers
    with server_harness.ServerProcess(demo_model_dir) as server:  # a private server: it may die
        request = pb.RunRequest(residual=tensor_to_proto(ref_cache[f"blocks.{n - 1}.hook_resid_post"]),
                                start_at_layer=n)
        try:
            out = run_raw(server.stub(), request)
        finally:
            time.sleep(0.2)
            assert server.proc.poll() is None, f"remotelens_server exited with {server.proc.returncode}"
        assert_close(out["logits"], ref_logits)
