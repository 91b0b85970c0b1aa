"""`dlis sim`: a discrete-event simulation (SimPy) of the market, driving the project's own code.

* :mod:`scenario` -- the network as a file (YAML/JSON) and what-if changes;
* :mod:`profiles` -- device classes, batching slowdown and settlement gas, with their sources;
* :mod:`network` -- peers' live state and the pruned network state given to ``plan_route``;
* :mod:`engine` -- the SimPy processes (churn, clients, failover, spot checks, settlement, reputation);
* :mod:`economics` -- the contracts' money rules and the cheating incentive bound;
* :mod:`report` -- figures, confidence intervals over seeds, tables.
"""
