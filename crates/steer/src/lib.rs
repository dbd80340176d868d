//! Steering-vector math and files.
