"""The trusted secure aggregator as its own process (`asyncfl tsa init|serve`): it holds the key
pair clients seal their mask seeds to and the durable record of used contributions, and answers
the FL server's unmask requests over HTTP. It stands in for a TEE enclave (docs/secure-aggregation.md)."""
