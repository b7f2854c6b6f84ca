// Does the L3 keep what one pass read? Reads N MB once, then times a second read in the
// same direction and in the reverse one (one thread, 30 rounds).
// Build and run (outside CI): gcc -O2 -march=native -ffast-math second_pass.c -o second_pass &&
//   for m in 8 16 24 32 48 64; do ./second_pass $m; done
// Quoted in bench/RESULTS.md (why the channels-last second pass cannot come from cache).
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t mb=atoi(argv[1]); size_t n=mb*(1<<20)/8; double*a=malloc(n*8);
  for(size_t i=0;i<n;i++)a[i]=i;
  double s=0, tf=0,tb=0; int R=30;
  for(int r=0;r<R;r++){
    for(size_t i=0;i<n;i++)s+=a[i];
    double t=now(); for(size_t i=0;i<n;i++)s+=a[i]; tf+=now()-t;
    for(size_t i=0;i<n;i++)s+=a[i];
    t=now(); for(size_t i=n;i-->0;)s+=a[i]; tb+=now()-t;
  }
  printf("%zu MB: second read fwd %.2f GB/s, rev %.2f GB/s (%g)\n",mb,n*8.0*R/tf/1e9,n*8.0*R/tb/1e9,s);
}
