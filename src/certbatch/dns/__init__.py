"""dns-01 through a DNS provider: records, CNAME following, the propagation check.

One module per job:
  provider.py     the interface every provider implements (add one TXT value, remove that value)
  lookup.py       the DNS queries certbatch makes itself (CNAME chain, zone, authoritative servers)
  propagation.py  wait until every authoritative server of a zone answers with the value
  rfc2136.py      the rfc2136 provider: dynamic update signed with TSIG
  lexicon.py      the lexicon provider: ~90 DNS providers' APIs through dns-lexicon (optional)
  acmedns.py      the acme-dns provider, and `certbatch acme-dns register`
  solver.py       the dns-01 solver that ties them together for challenges.py
  secrets.py      which secrets the config holds, and which secret files others can read

A new provider is one more module like rfc2136.py plus one branch in `solver.make_provider`.
Only this package imports dnspython (and lexicon), and only when a provider is used.
"""
