#![no_std]

// A library target lets forwarder-bench name this crate as a build
// dependency, so cargo rebuilds the embedded object when it changes.
