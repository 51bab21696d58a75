"""Learning quality of crowdfl under local differential privacy and Byzantine customers (issue 7).

Runs the real pipeline code in one process, without brokers or chains: the int8 TFLite front
(`crowdfl.front.FrontModel`), the agent's noise (`agent.privacy.privatise_features`), the edge's
training (`edge_server.trainer.train_customer`, or its numpy mirror `bench.quality.fasttrain`
checked against it in every run), and the coordinator's aggregation, rule parameters and
reputation. `python -m bench.quality [--quick]` regenerates every figure and the report.
"""
