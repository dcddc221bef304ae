"""Pure functions on captured arrays (numpy only): connectivity, graphs, anchors, weights."""
