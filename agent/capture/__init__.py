"""Capture: packets from capture files (pcap, pcapng) and live interfaces (AF_PACKET ring), and
the decoder that turns them into columns of header fields. The first layer: imports no other."""
