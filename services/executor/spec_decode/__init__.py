"""Speculative decoding in the executor: proposers (n-gram lookup, a draft model), the
back-off that sizes each request's drafts, and verification by rejection sampling."""
