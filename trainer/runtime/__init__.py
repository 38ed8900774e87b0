"""Process plumbing, apart from the science: devices and hosts (`distributed`, `multihost`), huge-page
re-execution (`hugepages`), Ctrl+C / SIGTERM handling (`signals`) and the one-line error policy (`errors`)."""
