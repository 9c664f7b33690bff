-- The expert lists of one layer (co-activation within a layer). $layer is bound as a parameter.
SELECT experts FROM routes WHERE layer = $layer;
