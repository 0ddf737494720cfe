"""Real parts to run kvscale against, for the tests, the benchmarks and the demo: processes on free ports
(:mod:`harness.procs`), simulator pods (:mod:`harness.simpods`), the real vLLM CPU server and its tiny local model
(:mod:`harness.vllm_server`, :mod:`harness.tinymodel`), a real Prometheus (:mod:`harness.prometheus`), X.509
certificates (:mod:`harness.certs`) and an open-loop load generator (:mod:`harness.load`).

Above the simulator, below nothing that serves: the router and the scaler never import it.
"""
