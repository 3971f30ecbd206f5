"""The shared test harness: everything tests need besides fixtures (those are in tests/conftest.py).

    proxy.py            the proxy in this process: RunningProxy (make_proxy), ObservedProxy with an
                        admin listener (observed_proxy), proxy_config_dict, config_document, served_by
    processes.py        the proxy as a subprocess (python -m proxy.serve.cli -c FILE): ProxyRun,
                        running_proxy, proxy_config text, Load, worker PIDs and /status with workers
    command.py          the real `pyproxy` command: run_cli, proxy_running, one_backend_config,
                        assert_one_line_problem
    backends.py         real backends on port 0: ScriptedBackend (records requests, answers from
                        routes), RawBackend (a script per connection), FlakyBackend (health that fails
                        on demand), NamedBackend and JsonEchoServer (answer with their name)
    faulty_upstream.py  FaultyUpstream: a raw upstream scripted step by step (HEAD, write, FIN, RST...)
    proxy_protocol_backend.py  ProxyProtocolBackend: an upstream that parses the PROXY header of
                        each connection (its own parser) and answers with the connection's index
    client.py           RawClient: a raw socket that reads responses with their framing
    http1_feeding.py    feeding the HTTP/1 parsers at every split; valid_requests (a hypothesis strategy)
    timing.py           FakeClock (advanced by hand) and wait_for (bounded polling)
    ports.py            free_port, port_open
    echo_server.py      the core tests' line-echo protocol on a SocketServer, and LineClient
    records.py          stand-ins for a request record and a small Application (observer tests)
    dns.py              dnsmasq on 127.0.0.1 serving records the test rewrites (Dnsmasq, running_dnsmasq),
                        and NamedBackends on 127.0.0.2, .3, ... sharing one port (backends_on_loopback)

tests/conformance/recorder.py (an upstream that records the exact bytes it gets) belongs to the
conformance package.
"""
