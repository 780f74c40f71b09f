"""What erase/ and everything above it share, split by concern (as accelerate's ``utils/``): ``errors`` (one-line
user errors), ``files`` (atomic writes, hashes), ``checks`` (numbers, weights, free space), ``folders`` (output-folder
claims, locks, temporaries, swaps), ``images`` (input image folders), ``text`` (inert markdown), ``launch`` (logging,
the Accelerator of a command)."""
